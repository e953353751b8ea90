"""Mixture-of-Experts: routers against naive loops, capacity, dispatch/combine, aux losses,
sharding over the expert axis, and MoE blocks in a trained model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compile_of, init_of, random_batch_of, setup_of, tiny_config
from flax import nnx

from vlp import plan as plan_lib
from vlp.core import parallel
from vlp.core.config import ConfigError
from vlp.models import layers, moe


def _probs(g, s, e, seed=0, scale=2.0):
  logits = scale * np.random.default_rng(seed).standard_normal((g, s, e))
  return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def naive_top_k(probs, k, cap, batch_priority=False):
  """Token choice as the papers describe it, one assignment at a time."""
  g, s, e = probs.shape
  dispatch = np.zeros((g, s, e, cap), bool)
  combine = np.zeros((g, s, e, cap), np.float32)
  for gi in range(g):
    order = np.argsort(-probs[gi].max(-1), kind='stable') if batch_priority else np.arange(s)
    ranked = np.argsort(-probs[gi], axis=-1, kind='stable')  # each token's experts, best first
    used = [0] * e
    for r in range(k):
      for t in order:
        expert = ranked[t, r]
        if used[expert] < cap:
          dispatch[gi, t, expert, used[expert]] = True
          combine[gi, t, expert, used[expert]] = probs[gi, t, expert]
        used[expert] += 1
  return dispatch, combine


@pytest.mark.parametrize('k,cap,bpr', [(1, 2, False), (1, 3, True), (2, 3, False), (2, 2, True), (1, 16, False)])
def test_top_k_routing_matches_the_naive_loop(k, cap, bpr):
  probs = _probs(3, 16, 4)
  dispatch, combine = moe.top_k_routing(jnp.asarray(probs), k, cap, bpr)
  want_d, want_c = naive_top_k(probs, k, cap, bpr)
  np.testing.assert_array_equal(np.asarray(dispatch), want_d)
  np.testing.assert_allclose(np.asarray(combine), want_c, rtol=1e-6)
  d = np.asarray(dispatch)
  assert d.sum(axis=1).max() <= 1  # a slot holds at most one token
  assert d.sum(axis=(1, 3)).max() <= cap  # capacity never exceeded
  assert d.sum(axis=(2, 3)).max() <= k  # a token gets at most k experts


def test_batch_priority_keeps_the_most_confident_tokens():
  # all 8 tokens want expert 0 (capacity 2); BPR keeps the two with the highest gate
  probs = np.full((1, 8, 2), 0.0, np.float32)
  probs[0, :, 0] = np.linspace(0.6, 0.95, 8)[::-1][np.array([3, 1, 7, 0, 5, 2, 6, 4])]
  probs[0, :, 1] = 1 - probs[0, :, 0]
  d, _ = moe.top_k_routing(jnp.asarray(probs), 1, 2, batch_priority=True)
  kept = np.flatnonzero(np.asarray(d)[0, :, 0].any(-1))
  assert set(kept) == set(np.argsort(-probs[0, :, 0])[:2])
  d, _ = moe.top_k_routing(jnp.asarray(probs), 1, 2, batch_priority=False)
  assert set(np.flatnonzero(np.asarray(d)[0, :, 0].any(-1))) == {0, 1}  # first come


def test_expert_choice_gives_every_expert_exactly_its_capacity():
  probs = _probs(2, 12, 3, seed=1)
  cap = moe.capacity('expert_choice', 12, 3, 1, 1.0)
  assert cap == 4
  dispatch, combine = moe.expert_choice_routing(jnp.asarray(probs), cap)
  d, c = np.asarray(dispatch), np.asarray(combine)
  assert (d.sum(axis=1) == 1).all()  # every slot of every expert is filled, once
  for gi in range(2):
    for e in range(3):
      want = set(np.argsort(-probs[gi, :, e], kind='stable')[:cap])
      assert set(np.flatnonzero(d[gi, :, e].any(-1))) == want
      np.testing.assert_allclose(c[gi, :, e].sum(-1), np.where(d[gi, :, e].any(-1), probs[gi, :, e], 0), rtol=1e-6)


@pytest.mark.parametrize('router', ['top_k', 'expert_choice'])
def test_combine_after_dispatch_with_identity_experts_returns_kept_tokens(router):
  probs = _probs(2, 10, 4, seed=2)
  x = np.random.default_rng(3).standard_normal((2, 10, 5)).astype(np.float32)
  cap = moe.capacity(router, 10, 4, 1, 1.0)
  if router == 'top_k':
    dispatch, combine = moe.top_k_routing(jnp.asarray(probs), 1, cap)
  else:
    dispatch, combine = moe.expert_choice_routing(jnp.asarray(probs), cap)
  buffers = jnp.einsum('gsec,gsd->egcd', dispatch.astype(jnp.float32), x)
  back = np.asarray(jnp.einsum('gsec,egcd->gsd', dispatch.astype(jnp.float32), buffers))
  times = np.asarray(dispatch).sum(axis=(2, 3))  # how many experts took each token
  np.testing.assert_allclose(back, x * times[..., None], rtol=1e-6, atol=1e-6)
  gated = np.asarray(jnp.einsum('gsec,egcd->gsd', combine, buffers))
  np.testing.assert_allclose(gated, x * np.asarray(combine).sum(axis=(2, 3))[..., None], rtol=1e-5, atol=1e-6)
  if router == 'top_k':
    assert (times <= 1).all() and times.sum() <= 4 * cap * 2


def test_load_balance_loss_is_switch_formula_and_minimal_when_uniform():
  e = 4
  uniform = np.full((2, 6, e), 1 / e, np.float32)
  assert float(moe.load_balance_loss(jnp.asarray(uniform), jnp.zeros((2, 6), jnp.int32))) == pytest.approx(1.0)
  probs = _probs(2, 6, e, seed=4, scale=4.0)
  first = probs.argmax(-1)
  f = np.bincount(first.ravel(), minlength=e) / first.size
  want = e * np.sum(f * probs.reshape(-1, e).mean(0))
  got = float(moe.load_balance_loss(jnp.asarray(probs), jnp.asarray(first)))
  assert got == pytest.approx(want, rel=1e-6) and got > 1.0
  logits = np.random.default_rng(5).standard_normal((3, 4, e)).astype(np.float32)
  z = np.log(np.exp(logits).sum(-1))
  assert float(moe.router_z_loss(jnp.asarray(logits))) == pytest.approx(np.mean(z ** 2), rel=1e-5)


def test_moe_blocks_selection():
  assert layers.moe_blocks(4, {'num_experts': 0, 'every': 1, 'last': 0}) == [False] * 4
  assert layers.moe_blocks(4, {'num_experts': 4, 'every': 2, 'last': 0}) == [False, True, False, True]
  # IMP: the last 6 of 12
  assert layers.moe_blocks(12, {'num_experts': 16, 'every': 1, 'last': 6}) == [False] * 6 + [True] * 6
  assert layers.moe_blocks(6, {'num_experts': 4, 'every': 2, 'last': 4}) == [False, False, False, True, False, True]


def _moe_config(**moe_overrides):
  c = tiny_config()
  c.model.image.moe.update(num_experts=4, every=1, **moe_overrides)
  c.model.text.moe.update(num_experts=4, every=2)
  return c


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
@pytest.mark.parametrize('router', ['top_k', 'expert_choice'])
def test_expert_axis_sharded_over_4_devices_matches_unsharded(router):
  config = _moe_config(router=router, k=2 if router == 'top_k' else 1)
  one = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}, devices=jax.devices()[:1])
  ep = parallel.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 4})
  losses = {}
  for name, mesh in (('one', one), ('expert', ep)):
    setup = setup_of(config, mesh)
    state = init_of(config, setup)
    train_step, _ = compile_of(config, setup)
    batch = random_batch_of(config, mesh)
    out = []
    for _ in range(2):
      state, m = train_step(state, batch)
      out.append(float(m['loss']))
    losses[name] = out
    if name == 'expert':
      w1 = state['params']['image']['encoder']['blocks'][0]['mlp']['w1']
      assert w1.sharding.spec[0] == 'expert' and w1.addressable_shards[0].data.shape[0] == 1
      assert 'moe/image/encoder/blocks/0/mlp/load_balance' in m and 'contrastive_loss' in m
      assert float(m['loss']) > float(m['contrastive_loss'])  # the aux losses are added
  np.testing.assert_allclose(losses['expert'], losses['one'], rtol=0, atol=1e-5)


def test_moe_layer_with_remat_reports_the_same_aux():
  m = moe.MoeMlp(8, 16, 4, rngs=nnx.Rngs(0), router='top_k', k=2, capacity_factor=1.0)
  x = jax.random.normal(jax.random.key(1), (3, 10, 8))
  weights = {'load_balance': 1.0, 'router_z': 1.0}
  y, plain = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(m, x)
  y2, remat = nnx.capture(nnx.remat(lambda m, x: m(x)), nnx.Intermediate)(m, x)
  np.testing.assert_allclose(y2, y, rtol=1e-6)
  (total, plain), (_, remat) = moe.aux_losses(plain, weights), moe.aux_losses(remat, weights)
  assert plain.keys() == remat.keys() == {'moe/load_balance', 'moe/router_z', 'moe/drop_rate',
                                          'moe/max_expert_load'}
  for k in plain:
    np.testing.assert_allclose(remat[k], plain[k], rtol=1e-6)
  assert float(total) == pytest.approx(float(plain['moe/load_balance'] + plain['moe/router_z']))
  np.testing.assert_allclose(m(x), y, rtol=1e-6)  # outside capture (eval): same output, nothing kept
  assert not nnx.state(m, nnx.Intermediate)


@pytest.mark.parametrize('key,value,match', [
    ('router', 'hash', "model.image.moe.router"),
    ('num_experts', 1, "model.image.moe.num_experts"),
    ('k', 5, "model.image.moe.k"),
    ('last', 9, "model.image.moe.every"),
])
def test_bad_moe_config_names_the_key(key, value, match):
  c = _moe_config(router='top_k')
  c.model.image.moe[key] = value
  with pytest.raises(ConfigError, match=match):
    plan_lib.validate(c, num_devices=8)


@pytest.mark.parametrize('router,k', [('expert_choice', 1), ('top_k', 2)])
def test_analytic_flops_of_an_moe_tower_match_xla(router, k):
  from vlp.models import flops
  from vlp.models.vit import ViT
  cfg = dict(image_size=32, patch_size=4, width=64, depth=2, num_heads=2, mlp_dim=256,
             moe=dict(num_experts=4, every=1, last=0, router=router, k=k, capacity_factor=1.0,
                      batch_priority=False))
  model = ViT(**cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  images = jnp.zeros((2, 32, 32, 3))
  xla = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, images).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  got = 2 * flops.vit_forward_flops(cfg, embed_dim=0)
  dense = 2 * flops.vit_forward_flops({**cfg, 'moe': None}, embed_dim=0)
  assert got == pytest.approx(xla['flops'], rel=0.05)
  assert got != dense
