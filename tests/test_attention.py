"""model.attention: jax.nn.dot_product_attention (cuDNN's fused kernel on a GPU; XLA's ops on a
CPU) computes what vlp's own einsum attention does: values and gradients, with each kind of mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from vlp import plan as plan_lib
from vlp.core import config_files
from vlp.core.config import ConfigError
from vlp.models import layers

B, L, W, H = 3, 7, 32, 4


def _masks():
  pad = jnp.array([[True] * L, [True] * 4 + [False] * 3, [True] + [False] * (L - 1)])  # [B, S]: padded keys
  causal = jnp.tril(jnp.ones((L, L), bool))[None] & pad[:, None, :]  # [B, L, S], a row of no key at all
  return {'none': None, 'keys': pad, 'per_query': causal.at[2, 0].set(False)}


def _value_and_grads(module, *args):
  """A loss of the module's output, and its gradients for the params and the first input (jitted)."""
  graphdef, state = nnx.split(module)

  def loss(s, x, *rest):
    y = nnx.merge(graphdef, s)(x, *rest)
    return jnp.sum(jnp.sin(y) * jnp.cos(jnp.arange(y.size)).reshape(y.shape))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, *args)


def _same(a, b):
  (la, ga), (lb, gb) = a, b
  np.testing.assert_allclose(lb, la, rtol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(v, u, rtol=1e-4, atol=1e-6), ga, gb)


@pytest.mark.parametrize('mask', ['none', 'keys', 'per_query'])
@pytest.mark.parametrize('keep', [False, True])
def test_self_attention_is_the_same_either_way(mask, keep):
  """Padded keys, a causal mask with a query that may attend to nothing, a pooled block's one query."""
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, W))
  kept = jnp.array([0, 3, 6]) if keep else None
  _same(*(_value_and_grads(layers.SelfAttention(W, H, rngs=nnx.Rngs(1), arch=layers.Arch(attention=impl),
                                                qk_norm=True), x, _masks()[mask], kept)
          for impl in ('xla', 'dot_product_attention')))


def test_cross_attention_is_the_same_either_way():
  q, kv = (jax.random.normal(jax.random.PRNGKey(i), (B, n, W)) for i, n in ((0, 2), (1, L)))
  _same(*(_value_and_grads(layers.CrossAttention(W, W, H, rngs=nnx.Rngs(2), arch=layers.Arch(attention=impl)), q, kv)
          for impl in ('xla', 'dot_product_attention')))


def test_auto_is_the_fused_kernel_on_gpus_only_and_the_key_reaches_every_tower():
  assert layers.fused_attention('auto') == (jax.default_backend() == 'gpu')
  assert layers.fused_attention('dot_product_attention') and not layers.fused_attention('xla')
  config = config_files.apply_overrides(tiny_config(), ['model.attention=dot_product_attention'])
  model = nnx.eval_shape(lambda: plan_lib.make(config, 8).recipe.build(config.model, 0))
  impls = {m.impl for _, m in nnx.iter_graph(model) if isinstance(m, (layers.SelfAttention, layers.CrossAttention))}
  assert impls == {'dot_product_attention'}


def test_an_unknown_attention_is_one_error_naming_the_key():
  with pytest.raises(ConfigError, match="'model.attention'"):
    plan_lib.make(config_files.apply_overrides(tiny_config(), ['model.attention=flash']), 8)
