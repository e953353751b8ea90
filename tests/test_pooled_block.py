"""A tower pooled at one token computes its last block for that token alone (Encoder's keep):
the pooled output and every parameter's gradient are those of the whole stack's output at
that token. The whole-stack path is the one checked against open_clip and transformers
(test_interop, test_models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlp.models import layers
from vlp.models.text import TextEncoder
from vlp.models.vit import ViT

MOE = dict(num_experts=4, every=1, router='expert_choice', k=1, capacity_factor=1.0, batch_priority=False)


def _grads(model, fn, *args):
  """The value of sum(sin(fn(model, *args))) and its gradient with respect to every parameter."""
  loss = lambda m, *a: jnp.sum(jnp.sin(fn(m, *a)))
  return nnx.jit(nnx.value_and_grad(loss))(model, *args)


def _assert_same(a, b):
  (la, ga), (lb, gb) = a, b
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  # float32 sums in another order: a few ulps of the largest gradient apart; a wrong query,
  # key or residual is off by a tenth of it (one scale for the tree: some are zero in exact arithmetic)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(nnx.state(ga)))
  close = lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * scale)
  jax.tree.map(close, nnx.state(ga), nnx.state(gb))


MASKS = {
    'none': lambda: None,
    'keys': lambda: jnp.array([[True] * 7, [True] * 4 + [False] * 3, [True] * 2 + [False] * 5]),
    'causal': lambda: jnp.tril(jnp.ones((7, 7), bool))[None] & MASKS['keys']()[:, None, :],
}


SLOW = pytest.mark.slow  # the quick part keeps the plain stack under both masks


@pytest.mark.parametrize('mask,stack', [
    ('keys', {}), ('causal', {}), pytest.param('none', {}, marks=SLOW),
    pytest.param('causal', dict(scan=True), marks=SLOW), pytest.param('causal', dict(remat='full'), marks=SLOW),
    pytest.param('keys', dict(qk_norm=True), marks=SLOW), pytest.param('keys', dict(depth=1), marks=SLOW),
    pytest.param('keys', dict(moe=dict(MOE, last=1)), marks=SLOW)])
def test_keep_computes_the_whole_stack_at_those_positions(mask, stack):
  stack = dict(stack)
  depth = stack.pop('depth', 3)
  make = lambda: layers.Encoder(32, depth, 2, 64, rngs=nnx.Rngs(0), **stack)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 32))
  mask, keep = MASKS[mask](), jnp.array([6, 3, 1])
  whole = _grads(make(), lambda m, h: layers.pick(m(h, mask), keep)[:, 0], x)
  _assert_same(whole, _grads(make(), lambda m, h: m(h, mask, keep=keep), x))


def test_an_int_position_is_every_examples():
  """keep=0, as a [CLS] pool asks, or -1, the last position."""
  make = lambda: layers.Encoder(32, 2, 2, 64, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 32))
  for keep in (0, -1):
    _assert_same(_grads(make(), lambda m, h: m(h)[:, keep], x), _grads(make(), lambda m, h: m(h, keep=keep), x))


def test_post_ln_blocks_keep_the_same_positions():
  """BERT's layout: norm(x + layer(x)), the residual taken at the kept positions."""
  block = lambda: layers.Block(32, 2, 64, rngs=nnx.Rngs(0), post_ln=True)
  x, keep = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 32)), jnp.array([4, 0])
  _assert_same(_grads(block(), lambda m, h: layers.pick(m(h), keep), x),
               _grads(block(), lambda m, h: m(h, keep=keep), x))


@pytest.mark.parametrize('pool,causal', [('cls', False), ('eos', True), ('last', False)])
def test_the_text_tower_pools_what_its_whole_stack_gives(pool, causal):
  tower = lambda: TextEncoder(50, 8, 32, 2, 2, 64, causal=causal, pool=pool, rngs=nnx.Rngs(0))
  tokens = jnp.array([[2, 7, 9, 3, 0, 0, 0, 0], [2, 5, 6, 7, 8, 9, 11, 3]])
  where = {'cls': jnp.array([0, 0]), 'eos': jnp.array([3, 7]), 'last': jnp.array([7, 7])}[pool]

  def whole(m, t):  # the tower's own embedding and mask, the stack run whole, pooled after
    mask = t != 0
    if causal:
      mask = jnp.tril(jnp.ones((8, 8), bool))[None] & mask[:, None, :]
    x = jnp.take(m.token_embed[...], t, axis=0) + m.pos_embed[...]
    return layers.pick(m.encoder(x, mask), where)[:, 0]

  _assert_same(_grads(tower(), whole, tokens), _grads(tower(), lambda m, t: m(t), tokens))


def test_the_vit_pools_cls_from_its_whole_stack():
  vit = lambda: ViT(16, 8, 32, 2, 2, 64, pool='cls', ln_pre=True, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 16, 3), minval=-1, maxval=1)
  _assert_same(_grads(vit(), lambda m, x: m.tokens(x)[:, 0], images), _grads(vit(), lambda m, x: m(x), images))


def test_the_last_block_computes_one_query_per_example():
  """The program's MLP of the last block is [B, 1, ...]: of two blocks, one runs on every token."""
  enc = layers.Encoder(32, 2, 2, 64, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(enc)
  program = lambda **kw: str(jax.make_jaxpr(lambda s, h: nnx.merge(graphdef, s)(h, **kw))(state, jnp.zeros((3, 7, 32))))
  whole, kept = program(), program(keep=0)
  assert 'f32[3,1,64]' in kept and 'f32[3,1,64]' not in whole  # the last MLP's hidden layer, one token
  assert 2 * kept.count('f32[3,7,64]') == whole.count('f32[3,7,64]')
