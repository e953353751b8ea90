"""model.scan_layers stores each run of like blocks stacked (vlp.models.stacks): a leading axis
over the run, the step scans it as stored. The same training as the unrolled model; checkpoints
of either layout restore into the other; exports and init.from keep per-block names; the
compiled step takes one argument per stacked param, not one per block."""
import json
import os
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import init_of, plan_of, setup_of, tiny_config, train_losses

from vlp import export
from vlp.core import config_files, parallel, trees, weights_files
from vlp.core.config import ConfigError
from vlp.models import stacks
from vlp.train import init_from, optim
from vlp.workdir import checkpoints, identity

DEPTH = {'model.image.depth': 3, 'model.text.depth': 3}


def _configs(**overrides):
  """(unscanned, scanned) configs, two objects (apply_overrides changes its config in place)."""
  return tiny_config(**DEPTH, **overrides), tiny_config(**DEPTH, **overrides, **{'model.scan_layers': True})


def _fsdp():
  return parallel.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1})


def _per_block(tree) -> dict:
  """{'/'-joined per-block name: numpy array} of a state tree, stored stacked or not."""
  flat = {'/'.join(map(stacks._name, path)): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(
      jax.device_get(tree))[0]}
  return stacks.per_block(flat)


def _assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_scanned_params_are_stored_stacked_with_a_replicated_leading_axis():
  plain, scanned = _configs()
  setup = setup_of(scanned, _fsdp())
  blocks = setup.abstract['params']['text']['encoder']['blocks']
  assert list(blocks) == ['0-2']
  qkv = blocks['0-2']['attn']['qkv']
  assert qkv.shape == (3, 32, 3, 2, 16)  # [depth, width, q/k/v, heads, head_dim]
  assert tuple(qkv.sharding.spec)[:2] == (None, 'fsdp')  # each device holds its rows of every block
  # the same seed gives the same params, block by block
  mesh = _fsdp()
  _assert_same(_per_block(init_of(plain, setup_of(plain, mesh))['params']),
               _per_block(init_of(scanned, setup)['params']))


@pytest.mark.slow  # two trainings of two steps (40-70 s)
def test_a_scanned_run_trains_as_the_unrolled_one():
  """Losses and the whole state (params and Adam's moments, weight decay on matrices only)
  after two FSDP steps."""
  plain, scanned = _configs()
  la, sa, *_ = train_losses(plain, _fsdp(), steps=2)
  lb, sb, *_ = train_losses(scanned, _fsdp(), steps=2)
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  a, b = _per_block(sa), _per_block(sb)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=2e-6, err_msg=k)


def test_weight_decay_takes_the_same_params_in_either_layout():
  """Matrices decay, vectors do not: a stacked LayerNorm scale is a vector of each block."""
  masks = []
  for config in _configs():
    mask = optim.decay_mask(tuple(config.optim.no_decay))(plan_of(config).params(_fsdp()).abstract)
    masks.append({n: m for k, m in trees.flatten(mask) for n in stacks.per_block_names(k.replace('.', '/'))})
  assert masks[0] == masks[1] and masks[1]['text/encoder/blocks/2/ln1/scale'] is False


@pytest.mark.parametrize('save_scanned', [False, True])
def test_a_checkpoint_restores_into_the_other_layout(tmp_path, save_scanned):
  """A run may switch scan_layers and resume: the saved layout is read from the checkpoint's tree
  metadata and converted, the whole state (params, optimizer state) and its shardings."""
  plain, scanned = _configs()
  saved_cfg, load_cfg = (scanned, plain) if save_scanned else (plain, scanned)
  mesh = _fsdp()
  state = init_of(saved_cfg, setup_of(saved_cfg, mesh))
  state = {**state, 'opt_state': jax.tree.map(lambda x: x + 1 if x.ndim else x, state['opt_state'])}
  saver = checkpoints.manager(str(tmp_path), saved_cfg.checkpoint)
  saver.save(1, state, force=True)
  saver.wait()
  setup = setup_of(load_cfg, mesh)
  restored = saver.restore(1, setup.abstract)
  saver.close()
  assert jax.tree.structure(restored) == jax.tree.structure(setup.abstract)
  jax.tree.map(lambda x, a: (x.shape == a.shape and x.sharding == a.sharding) or pytest.fail(str(a)),
               restored, setup.abstract)
  _assert_same(_per_block(restored), _per_block(state))


def _workdir(path, config, state):
  identity.check_workdir(config, str(path))
  saver = checkpoints.manager(str(path), config.checkpoint)
  saver.save(1, state, force=True)
  saver.wait()
  saver.close()
  return str(path)


def test_an_export_of_a_scanned_run_is_that_of_the_unrolled_run(tmp_path):
  """Per-block names and the same weights, encoders that take them; init.from of the export
  into a scanned run stacks them back."""
  plain, scanned = _configs()
  mesh = _fsdp()
  outs = {}
  for name, config in (('plain', plain), ('scanned', scanned)):  # the same seed: the same weights
    workdir = _workdir(tmp_path / name, config, init_of(config, setup_of(config, mesh)))
    outs[name] = export.export(workdir, str(tmp_path / f'{name}_export'))
  a, b = (weights_files.read(o) for o in outs.values())
  _assert_same(a, b)
  assert any('.blocks.2.' in k for k in b)
  meta = [json.loads((tmp_path / f'{n}_export' / 'config.json').read_text()) for n in outs]
  assert meta[0]['param_keys'] == meta[1]['param_keys'] and meta[1]['model']['scan_layers'] is True
  model, _ = export.load(outs['scanned'])  # the per-block model: the weights match it
  loaded = init_from.load(config_files.apply_overrides(_configs()[1], [f'init.from={outs["scanned"]}']),
                          plan_of(scanned).params(mesh).abstract, log=lambda *_: None)
  stacked = loaded['image']['encoder']['blocks']['0-2']['mlp']['fc1']['kernel']
  np.testing.assert_array_equal(stacked[1], a['image.encoder.blocks.1.mlp.fc1.kernel'])


def test_a_transformers_export_of_a_scanned_run_is_that_of_the_unrolled_run(tmp_path):
  """`vlp export --format=hf` of a workdir that stores its stacks stacked: the same SiglipModel
  weights, tensor for tensor, as the unrolled run of the same seed."""
  from test_interop import SIGLIP_LAYOUT
  from vlp import cli
  plain, scanned = _configs(**SIGLIP_LAYOUT)
  mesh = _fsdp()
  out = {}
  for name, config in (('plain', plain), ('scanned', scanned)):
    workdir = _workdir(tmp_path / name, config, init_of(config, setup_of(config, mesh)))
    assert cli.main(['export', f'--workdir={workdir}', '--format=hf', f'--out={tmp_path / name}_hf']) == 0
    out[name] = safetensors.numpy.load_file(str(tmp_path / f'{name}_hf' / 'model.safetensors'))
  _assert_same(out['plain'], out['scanned'])
  assert 'vision_model.encoder.layers.2.mlp.fc1.weight' in out['scanned']


def test_vlp_eval_with_a_config_of_the_other_layout(tmp_path):
  """`vlp eval --config=...` whose model.scan_layers is not the workdir's takes the workdir's
  params in the config's layout: the same metrics as with the workdir's own config. (A scanned
  run evaluated unrolled; the conversion the other way is the checkpoint tests'.)"""
  from vlp import cli
  _, scanned = _configs()
  workdir = _workdir(tmp_path / 'wd', scanned, init_of(scanned, setup_of(scanned, _fsdp())))
  unrolled = [f'--config={os.path.join(os.path.dirname(__file__), "tiny.py")}',
              *(f'--config.{k}={v}' for k, v in DEPTH.items()), '--config.model.scan_layers=False']
  metrics = []
  for name, given in (('own', []), ('unrolled', unrolled)):
    out = tmp_path / f'{name}.json'
    assert cli.main(['eval', f'--workdir={workdir}', f'--json={out}', *given]) == 0
    metrics.append(json.loads(out.read_text())[0]['metrics'])
  assert metrics[0] == metrics[1] and metrics[0]


def test_init_from_takes_a_stacked_param_whole_or_not_at_all(tmp_path):
  plain, scanned = _configs()
  out = export.write(str(tmp_path / 'e'), plain.model, {k: np.asarray(v) for k, v in trees.flatten(
      jax.device_get(init_of(plain, setup_of(plain, _fsdp()))['params']))})
  only = config_files.apply_overrides(_configs()[1], [f'init.from={out}', "init.only=('image/encoder/blocks/1/.*',)"])
  with pytest.raises(ConfigError, match=r"'init.from'.* gives 1 of the 3 blocks of the stacked param"):
    init_from.load(only, plan_of(scanned).params(_fsdp()).abstract, log=lambda *_: None)


def _entry_parameters(config) -> int:
  """`parameter(` instructions in the entry computation of the lowered train step."""
  from vlp.train import step as step_lib
  plan, mesh = plan_of(config, _fsdp()), _fsdp()
  setup = setup_of(config, mesh)
  jitted = jax.jit(step_lib.make_train_step(plan, setup, plan.variants[0]),
                   in_shardings=(setup.shardings, parallel.batch_sharding(mesh)), donate_argnums=0)
  with parallel.activation_rules(mesh, setup.rules):
    text = jitted.lower(setup.abstract, plan.batch_spec(plan.variants[0], mesh)).as_text(dialect='hlo')
  entry = text[text.index('\nENTRY'):]
  return len(re.findall(r' parameter\(\d+\)', entry[:entry.index('\n}')]))


def test_the_step_takes_the_stored_stacks_as_they_are():
  """One argument per stacked param (and its Adam moments), not one per block: a tower's 3 blocks
  of 12 params each are 36 arguments unrolled, 12 stored stacked."""
  plain, scanned = _configs()
  leaves = lambda c: len(jax.tree.leaves(setup_of(c, _fsdp()).abstract))
  batch = len(plan_of(plain).variants[0].spec)
  assert _entry_parameters(scanned) == leaves(scanned) + batch
  assert _entry_parameters(plain) == leaves(plain) + batch
  assert leaves(plain) - leaves(scanned) == 3 * 2 * 2 * 12  # params, mu, nu: 2 towers x 2 of their 3 blocks
