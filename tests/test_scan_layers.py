"""model.scan_layers: each run of like blocks as one lax.scan over stacked params. The same
math as the unrolled stack: its losses over training steps, its gradients and the MoE
auxiliary losses are those of the unrolled blocks (ALIGN's and IMP's Encoder, ALBEF's text
and fusion stacks)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_losses, tiny_config
from flax import nnx

from vlp import recipes
from vlp.core import config as config_lib, parallel, config_files, trees
from vlp.models import layers, moe as moe_lib, stacks

MOE = dict(num_experts=4, every=1, router='expert_choice', k=1, capacity_factor=1.0, batch_priority=False)


def _one_device():
  return parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}, devices=jax.devices()[:1])


def _scans(model, *args) -> int:
  """The scans in the program of a module's call."""
  graphdef, state = nnx.split(model)
  return str(jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)).count('scan[')


def test_runs_group_like_blocks_and_leave_moe_blocks_alone():
  enc = layers.Encoder(16, 5, 2, 32, rngs=nnx.Rngs(0), moe=dict(MOE, last=2, every=2))
  runs = layers._runs(enc.blocks)
  assert [len(r) for r in runs] == [4, 1]  # blocks 0-3 dense; block 4 is MoE (the last 2, every 2nd)
  assert isinstance(runs[1][0].mlp, moe_lib.MoeMlp)


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_a_scanned_encoder_computes_the_unrolled_one(remat):
  """Outputs, every parameter's gradient and the MoE layer's sown aux losses."""
  kw = dict(rngs=nnx.Rngs(0), remat=remat, moe=dict(MOE, last=1))
  unrolled, scanned = layers.Encoder(32, 4, 2, 64, **kw), layers.Encoder(32, 4, 2, 64, scan=True, **dict(kw, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 32))
  mask = jnp.array([[True] * 6, [True] * 3 + [False] * 3])

  def loss(model, x):
    y, aux = nnx.capture(lambda m, h: m(h, mask), nnx.Intermediate)(model, x)
    total, _ = moe_lib.aux_losses(aux, {'load_balance': 1.0, 'router_z': 1.0})
    return jnp.sum(jnp.sin(y)) + total

  (la, ga), (lb, gb) = (nnx.jit(nnx.value_and_grad(loss))(m, x) for m in (unrolled, scanned))
  np.testing.assert_allclose(lb, la, rtol=1e-5)  # float32 sums fused in another order
  # gradients of order 0.1-1: a few float32 ulps apart (a misordered or shared block is off by ~0.1)
  a, b = (_per_block(g) for g in (ga, gb))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=5e-6, err_msg=k)
  assert _scans(scanned, x, mask) == 1 and _scans(unrolled, x, mask) == 0


def _per_block(module) -> dict:
  """{'/'-joined per-block name: array} of a module's params, stored stacked or not."""
  flat = {k.replace('.', '/'): np.asarray(v) for k, v in trees.flatten(nnx.to_pure_dict(nnx.state(module, nnx.Param)))}
  return stacks.per_block(flat)


@pytest.mark.parametrize('recipe', ['align', 'albef', 'imp', 'bert'])
def test_every_recipe_hands_scan_layers_to_its_stacks(recipe):
  """The config key reaches every block stack of every built-in model (the math of a scanned
  stack is checked above, and by the ALBEF run below)."""
  import tiny_imp
  if recipe == 'imp':
    config = tiny_imp.get_config()
  elif recipe == 'bert':
    config = recipes.base_config('bert')
    config.model.text.update(vocab_size=64, context_length=8, width=16, depth=2, num_heads=2, mlp_dim=32)
  else:
    config = tiny_config(recipe)
  config = config_files.apply_overrides(config, ['model.scan_layers=True'])
  model = recipes.get(recipe).build(config.model, 0)
  stacks = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and hasattr(m, 'scan')]
  assert stacks and all(m.scan is True for m in stacks)


@pytest.mark.slow  # trains ALBEF twice
def test_an_albef_run_trains_the_same_with_scanned_layers():
  """ALBEF's text-only blocks and its fusion blocks (cross-attending to the image) scanned;
  IMP's stack is the Encoder of the MoE test above."""
  config = tiny_config('albef', **{'model.text.depth': 4, 'model.fusion_layer': 2, 'albef.queue_size': 32})
  plain, *_ = train_losses(config, _one_device(), steps=2)
  scanned, *_ = train_losses(config_files.apply_overrides(config, ['model.scan_layers=True']), _one_device(), steps=2)
  np.testing.assert_allclose(scanned, plain, rtol=1e-5)


def test_scan_layers_takes_a_bool():
  with pytest.raises(config_lib.ConfigError, match="'model.scan_layers'"):
    config_files.apply_overrides(tiny_config(), ['model.scan_layers=yes'])
