"""LiT and fine-tuning: start from another run's params (init.from, a workdir or an export), lock
a tower (optim.frozen) and train the rest."""
import jax
import numpy as np
import pytest
from conftest import plan_of, setup_of, tiny_config

from vlp import export
from vlp.core import parallel, trees
from vlp.core.config import ConfigError
from vlp.train import loop, state as state_lib
from vlp.workdir import checkpoints


def _flat(params):
  return {k: np.asarray(jax.device_get(v)) for k, v in trees.flatten(params)}


def _fresh(plan, setup):
  return loop.fresh_state(plan, setup)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A trained tiny run (the image tower to lock) and its export."""
  root = tmp_path_factory.mktemp('lit')
  loop.train(tiny_config(total_steps=3), str(root / 'src'), progress=False)
  export.export(str(root / 'src'), str(root / 'src_export'))
  return root


@pytest.mark.slow
def test_lit_keeps_the_locked_tower_bit_for_bit_and_drops_its_optimizer_state(source, tmp_path, capsys):
  _, src, _ = checkpoints.restore_params(str(source / 'src'))
  src = _flat(src)
  lit = tiny_config(total_steps=4, **{'init.from': str(source / 'src'), 'optim.frozen': ('image/.*',)})
  loop.train(lit, str(tmp_path / 'lit'), progress=False)
  assert 'init.from' in capsys.readouterr().out
  _, got, step = checkpoints.restore_params(str(tmp_path / 'lit'))
  got = _flat(got)
  assert step == 4
  image = [k for k in got if k.startswith('image.')]
  assert image and all(np.array_equal(got[k], src[k]) for k in image)  # locked: bit for bit
  text = [k for k in got if k.startswith('text.') and got[k].ndim == 2]
  assert all(not np.array_equal(got[k], src[k]) for k in text)  # trained
  # no Adam moments for the locked tower: the memory table's opt_state row shrinks by 2x its bytes
  mesh = parallel.make_mesh(plan_of(lit).sizes)
  full = parallel.memory_table(setup_of(tiny_config(), mesh).abstract)
  locked = parallel.memory_table(setup_of(lit, mesh).abstract)
  image_bytes = sum(src[k].nbytes for k in image)
  assert full['opt_state'] - locked['opt_state'] == pytest.approx(2 * image_bytes, rel=0.01)


def test_the_locked_tower_has_no_backward_pass():
  """stop_gradient on the frozen params lets XLA drop the image tower's backward: fewer FLOPs."""
  from conftest import compile_of
  mesh = parallel.make_mesh(plan_of(tiny_config()).sizes)
  flops = {}
  for name, frozen in (('full', ()), ('lit', ('image/.*',))):
    c = tiny_config(**{'optim.frozen': frozen})
    compiled, _ = compile_of(c, setup_of(c, mesh))
    flops[name] = compiled.cost_analysis()['flops']
  assert flops['lit'] < 0.85 * flops['full'], flops


@pytest.mark.slow
def test_init_from_an_export_matches_by_name_and_lists_what_differs(source, capsys):
  """An export directory loads like the workdir; a param the source lacks keeps its init and is
  listed (the sigmoid head's bias), a shape mismatch is one error naming the param."""
  sig = tiny_config(**{'init.from': str(source / 'src_export'), 'model.head': 'sigmoid'})
  plan = plan_of(sig)
  setup = state_lib.make_setup(plan, parallel.make_mesh(plan.sizes))
  state = _fresh(plan, setup)
  out = capsys.readouterr().out
  assert 'kept at their init (not taken from the source): bias' in out, out
  _, src, _ = checkpoints.restore_params(str(source / 'src'))
  src, got = _flat(src), _flat(state['params'])
  assert all(np.array_equal(got[k], src[k]) for k in src)
  assert float(got['bias']) == -10.0  # the sigmoid head's own start
  # init.only: the image tower from the source, the rest as a fresh start would have it
  only = tiny_config(**{'init.from': str(source / 'src'), 'init.only': ('image/.*',)})
  fresh_cfg = tiny_config()
  fresh = _flat(_fresh(plan_of(fresh_cfg), state_lib.make_setup(plan_of(fresh_cfg), setup.mesh))['params'])
  got = _flat(_fresh(plan_of(only), state_lib.make_setup(plan_of(only), setup.mesh))['params'])
  for k in got:
    assert np.array_equal(got[k], src[k] if k.startswith('image.') else fresh[k]), k
  wide = tiny_config(**{'init.from': str(source / 'src'), 'model.image.mlp_dim': 96})
  plan = plan_of(wide)
  setup = state_lib.make_setup(plan, parallel.make_mesh(plan.sizes))
  with pytest.raises(ConfigError, match=r"'init.from'.*param image/encoder/blocks/0/mlp/fc1/bias has shape "
                                        r"\(64,\), this model \(96,\) \(and 5 more\)"):
    _fresh(plan, setup)
  with pytest.raises(ConfigError, match='neither a vlp workdir'):
    _fresh(plan_of(tiny_config(**{'init.from': str(source)})),
                         state_lib.make_setup(plan_of(tiny_config()), parallel.make_mesh(plan.sizes)))
