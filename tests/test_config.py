"""Config loading, overrides and validation: every error names the key."""
import os

import pytest

from vlp import plan as plan_lib, recipes
from vlp.core import config as config_lib, config_files
from vlp.core.config import ConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


@pytest.mark.parametrize('name', ['align_tiny.py', 'bench_tiny.py', 'albef_tiny.py', 'albef_base.py', 'imp_tiny.py',
                                  'imp_moe_tiny.py', 'lit_tiny.py'])
def test_shipped_configs_validate(name):
  c = config_files.load(os.path.join(CONFIGS, name))
  assert plan_lib.validate(c, num_devices=8) == {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}


@pytest.mark.parametrize('arg', ['arrayrecord', 'webdataset'])
def test_web_config_needs_its_data_paths(arg):
  c = config_files.load(os.path.join(CONFIGS, 'align_web.py'), arg)
  with pytest.raises(ConfigError, match="'data.train'"):
    plan_lib.validate(c, num_devices=8)
  c.data.train = 'laion/{00000..00009}.tar'
  assert plan_lib.validate(c, num_devices=8)['data'] == 8


def test_bench_tiny_is_the_issue_architecture():
  c = config_files.load(os.path.join(CONFIGS, 'bench_tiny.py'))
  dense = lambda tower: {k: v for k, v in tower.items() if k != 'moe'} if tower.moe.num_experts == 0 else None
  assert dense(c.model.image) == dict(image_size=64, patch_size=8, width=256, depth=4, num_heads=4,
                                      mlp_dim=1024, pool='cls', ln_pre=False, patch_bias=True, cls_token=True)
  assert dense(c.model.text) == dict(vocab_size=1024, context_length=32, width=256, depth=4,
                                     num_heads=4, mlp_dim=1024, causal=True, pool='eos', padding_mask=True,
                                     pad_id=0, eos_id=-1)
  assert (c.model.embed_dim, c.batch_size, c.model.dtype, c.optim.name) == (256, 128, 'float32', 'adamw')


def test_overrides_parse_with_the_type_of_the_default():
  c = recipes.base_config()
  config_files.apply_overrides(c, ['optim.lr=3e-4', 'total_steps=7', 'model.head=sigmoid',
                                 'checkpoint.async_save=False', 'optim.end_lr_frac=0',
                                 "data.languages=('en','de')"])
  assert (c.optim.lr, c.total_steps, c.model.head, c.checkpoint.async_save) == (3e-4, 7, 'sigmoid', False)
  assert isinstance(c.optim.end_lr_frac, float) and c.data.languages == ('en', 'de')


@pytest.mark.parametrize('override,message', [
    ('model.imge.width=3', "unknown config key 'model.imge.width'; did you mean 'model.image.width'?"),
    ('total_steps=ten', "config key 'total_steps': cannot parse 'ten'"),
    ('total_steps=1.5', "config key 'total_steps' expects int"),
    ('checkpoint.async_save=1', "config key 'checkpoint.async_save' expects true/false"),
    ('lr', "override 'lr' is not of the form key=value"),
])
def test_bad_overrides(override, message):
  with pytest.raises(ConfigError) as e:
    config_files.apply_overrides(recipes.base_config(), [override])
  assert message in str(e.value)


@pytest.mark.parametrize('override,key', [
    ('model.image.num_heads=3', 'model.image.num_heads'),
    ('model.image.patch_size=7', 'model.image.patch_size'),
    ('model.head=clip', 'model.head'),
    ('optim.name=sgd', 'optim.name'),
    ('batch_size=12', 'batch_size'),
    ('mesh.fsdp=3', 'mesh.data'),
    ('mesh.fsdp=-1', 'mesh'),
    ("data.languages=('en','xx')", 'data.languages'),
    ('model.remat=some', 'model.remat'),
    ('model.param_dtype=float16', 'model.param_dtype'),
    ('accum_steps=0', 'accum_steps'),
    ('mesh.expert=3', 'mesh.data'),
    ('checkpoint.keep_every=-1', 'checkpoint.keep_every'),
    ("mesh_rules=(('embed',),)", 'mesh_rules'),
    ('checkpoint.every=0', 'checkpoint.every'),
    ('log_every=0', 'log_every'),
    ('model.text.pool=mean', 'model.text.pool'),
    ('model.text.pool=cls', 'model.text.pool'),  # causal attention: CLS sees only itself
    ('model.arch.gelu=relu', 'model.arch.gelu'),
    ('model.arch.init=he', 'model.arch.init'),
    ('model.arch.ln_eps=0.0', 'model.arch.ln_eps'),
    ('model.logit_scale_init=-1.0', 'model.logit_scale_init'),
    ("optim.no_decay=(1,)", 'optim.no_decay'),
])
def test_validation_names_the_key(override, key):
  c = config_files.apply_overrides(recipes.base_config(), [override])
  with pytest.raises(ConfigError, match=f"config key '{key}'"):
    plan_lib.validate(c, num_devices=8)


@pytest.mark.parametrize('override,key', [
    ('nonfinite.max_consecutive=0', 'nonfinite.max_consecutive'),
    ('nonfinite.spike_zscore=0.0', 'nonfinite.spike_zscore'),
    ('loss.impl=allgather', 'loss.impl'),
    ('evals.retrieval.data=karpathy', 'evals.retrieval.path'),
    ('data.name=webdataset', 'data.train'),
])
def test_the_one_validation_pass_covers_every_section(override, key):
  """The guard, the loss and the data sources are checked by the pass every command runs (the plan:
  `vlp compile` too, which never ran the guard's checks before)."""
  c = config_files.apply_overrides(recipes.base_config(), [override])
  with pytest.raises(ConfigError, match=f"config key '{key}'"):
    plan_lib.make(c, num_devices=8)


def test_config_file_typo_is_an_error(tmp_path):
  path = tmp_path / 'typo.py'
  path.write_text('from vlp.recipes import base_config\n'
                  'def get_config(arg=None):\n  c = base_config()\n  c.modle = 1\n  return c\n')
  with pytest.raises(ConfigError, match='modle'):
    config_files.load(str(path))


def test_a_recipe_updates_common_sections_key_by_key():
  align, common = recipes.base_config('align'), config_lib.base_config()
  assert tuple(align.optim.no_decay) == () and tuple(common.optim.no_decay) == ('pos_embed',)
  assert align.optim.lr == common.optim.lr == 1e-3 and align.optim.b2 == 0.98  # the other keys kept
  with pytest.raises(AttributeError):  # still locked: a typo under optim is an error
    align.optim.no_decays = ()
