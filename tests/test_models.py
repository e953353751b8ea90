"""Model pieces: any-resolution position embeddings, padding mask, causal text and its pooling,
the architecture choices (init, GELU, LayerNorm eps), the heads' starts, logical axis names."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_model, tiny_config
from flax import nnx



def _model(**kw):
  return build_model(tiny_config(**kw).model)


def test_other_resolutions_interpolate_position_embeddings():
  model = _model()
  pos = np.asarray(model.image.pos_embed[...])  # [4, 4, D] for 16 px / patch 4
  np.testing.assert_array_equal(model.image.position_embeddings(4, 4), pos.reshape(16, -1))
  big = np.asarray(model.image.position_embeddings(8, 8)).reshape(8, 8, -1)
  # bilinear upsampling by 2 keeps the mean of each channel and stays within the range
  np.testing.assert_allclose(big.mean((0, 1)), pos.mean((0, 1)), atol=1e-6)
  assert big.min() >= pos.min() - 1e-6 and big.max() <= pos.max() + 1e-6
  emb = model.encode_image(jnp.zeros((2, 32, 32, 3)))
  assert emb.shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_padding_does_not_change_the_text_embedding():
  model = _model()
  short = jnp.array([[2, 10, 11, 3, 0, 0, 0, 0]])
  longer = jnp.array([[2, 10, 11, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_allclose(model.encode_text(short), model.encode_text(longer), atol=1e-6)
  other = jnp.array([[2, 10, 12, 3, 0, 0, 0, 0]])
  assert not np.allclose(model.encode_text(short), model.encode_text(other))


def test_heads_start_as_the_papers_say():
  clip, siglip = _model(), _model(**{'model.head': 'sigmoid'})
  assert float(clip.logit_scale()) == np.float32(1 / 0.07) and clip.logit_bias() is None  # CLIP's start
  assert float(siglip.logit_scale()) == np.float32(10.0) and float(siglip.logit_bias()) == -10.0
  align = _model(**{'model.logit_scale_init': 1.0})  # ALIGN's paper
  assert float(align.logit_scale()) == 1.0
  biased = _model(**{'model.head': 'sigmoid', 'model.logit_bias_init': -5.0, 'model.logit_scale_init': 2.0})
  assert float(biased.logit_bias()) == -5.0 and float(biased.logit_scale()) == np.float32(2.0)


def _text_features(model, tokens):
  return np.asarray(model.text(jnp.asarray(tokens)))


def test_causal_text_pools_at_sep_and_sees_only_the_past():
  model = _model()  # ALIGN's default text: causal, pooled at [SEP]
  assert model.text.causal and model.text.pool == 'eos'
  a = np.array([[2, 10, 11, 12, 3, 0, 0, 0]])
  b = np.array([[2, 10, 11, 12, 3, 7, 7, 7]])  # the same caption, other tokens after [SEP]
  c = np.array([[2, 10, 11, 13, 3, 0, 0, 0]])  # another word before [SEP]
  # Without pooling: the tokens up to [SEP] are the same in a and b
  x = lambda t: np.asarray(model.text.encoder(
      (jnp.take(model.text.token_embed[...], t, axis=0) + model.text.pos_embed[...][:t.shape[1]]),
      mask=jnp.asarray(t != 0)[:, None, :] & jnp.tril(jnp.ones((8, 8), bool))[None]))
  np.testing.assert_allclose(x(a)[:, :5], x(b)[:, :5], atol=1e-5)  # causal: the future is unseen
  np.testing.assert_allclose(_text_features(model, a), x(a)[:, 4], atol=1e-6)  # pooled at [SEP], index 4
  assert not np.allclose(_text_features(model, a), _text_features(model, c), atol=1e-4)
  # a batch of captions of several lengths pools each at its own [SEP]
  both = np.concatenate([a, np.array([[2, 10, 3, 0, 0, 0, 0, 0]])])
  np.testing.assert_allclose(_text_features(model, both)[0], _text_features(model, a)[0], atol=1e-5)


def test_bidirectional_text_pools_at_cls_and_sees_everything():
  model = _model(**{'model.text.causal': False, 'model.text.pool': 'cls'})  # BERT / ALIGN's paper
  a = np.array([[2, 10, 11, 12, 3, 0]])
  c = np.array([[2, 10, 11, 13, 3, 0]])
  assert not np.allclose(_text_features(model, a), _text_features(model, c), atol=1e-4)  # CLS sees token 3


SIGLIP = {'model.head': 'sigmoid', 'model.image.pool': 'map', 'model.image.cls_token': False,
          'model.image_proj': False, 'model.proj_bias': True, 'model.text.causal': False,
          'model.text.pool': 'last', 'model.text.padding_mask': False}


def _np_layernorm(x, scale, bias, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def test_siglips_map_head_is_attention_pooling_by_one_probe():
  """The MAP head against the formula (big_vision's MAPHead): softmax(probe Wq (X Wk)^T / sqrt(d))
  X Wv per head, the output projection, then y + MLP(LN(y)); no CLS token among the tokens."""
  model = _model(**SIGLIP)
  assert model.image.cls is None and model.image_proj is None
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  tokens = np.asarray(model.image.tokens(images), np.float64)
  assert tokens.shape == (3, 16, 32)  # 4 x 4 patches, no CLS
  h = model.image.map_head
  p = lambda v: np.asarray(v[...], np.float64)
  q = np.einsum('d,dhk->hk', p(h.probe)[0], p(h.attn.q)) + p(h.attn.q_bias)
  k, v = (np.einsum('bsd,dhk->bshk', tokens, p(h.attn.kv)[:, i]) + p(h.attn.kv_bias)[i] for i in range(2))
  logits = np.einsum('hk,bshk->bhs', q, k) / math.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum('bhs,bshk,hkd->bd', w, v, p(h.attn.out)) + p(h.attn.out_bias)
  ln = _np_layernorm(y, p(h.ln.scale), p(h.ln.bias), h.ln.eps)
  hidden = ln @ p(h.mlp.fc1.kernel) + p(h.mlp.fc1.bias)
  hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))  # exact GELU, ALIGN's default
  want = y + hidden @ p(h.mlp.fc2.kernel) + p(h.mlp.fc2.bias)
  np.testing.assert_allclose(np.asarray(model.project(images, None)[0]), want, atol=1e-5)


def test_siglips_text_attends_to_padding_and_pools_the_last_position():
  model = _model(**SIGLIP)
  a = np.array([[2, 10, 11, 3, 0, 0]])
  features = _text_features(model, a)
  t = jnp.asarray(a)
  hidden = np.asarray(model.text.encoder(jnp.take(model.text.token_embed[...], t, axis=0)
                                         + model.text.pos_embed[...][:6], mask=None))
  np.testing.assert_allclose(features, hidden[:, -1], atol=1e-6)  # the last position, a padding one
  longer = np.array([[2, 10, 11, 3, 0, 0, 0, 0]])  # as SigLIP: the padded length is part of the input
  assert not np.allclose(features, _text_features(model, longer), atol=1e-4)
  kernel, bias = np.asarray(model.text_proj.kernel[...]), np.asarray(model.text_proj.bias[...])
  np.testing.assert_allclose(np.asarray(model.project(None, t)[1]), features @ kernel + bias, atol=1e-5)


def test_siglips_layout_is_checked_before_compiling():
  from vlp import plan as plan_lib
  from vlp.core import config as config_lib
  check = lambda **kw: plan_lib.validate(tiny_config(**kw), num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="'model.image_proj'.*image.width == embed_dim"):
    check(**{**SIGLIP, 'model.embed_dim': 48})
  with pytest.raises(config_lib.ConfigError, match="'model.image.pool'.*CLS token"):
    check(**{'model.image.cls_token': False, 'model.image.pool': 'cls'})
  check(**SIGLIP)


def test_clip_init_scales_kernels_with_width_and_depth():
  """CLIP's init (open_clip's TextTransformer.init_parameters): std width^-0.5 for attention
  inputs, (2 width)^-0.5 for the MLP input, width^-0.5 (2 depth)^-0.5 for both output
  projections and width^-0.5 for the towers' projections."""
  width, depth = 128, 3
  model = _model(**{'model.text.width': width, 'model.text.mlp_dim': 512, 'model.text.depth': depth,
                    'model.text.num_heads': 4, 'model.arch.init': 'clip'})
  block = model.text.encoder.blocks[0]
  want = {'qkv': width ** -0.5, 'out': width ** -0.5 * (2 * depth) ** -0.5,
          'fc1': (2 * width) ** -0.5, 'fc2': width ** -0.5 * (2 * depth) ** -0.5}
  got = {'qkv': block.attn.qkv[...], 'out': block.attn.out[...],
         'fc1': block.mlp.fc1.kernel[...], 'fc2': block.mlp.fc2.kernel[...]}
  for k, std in want.items():
    x = np.asarray(got[k])
    assert abs(x.mean()) < 3 * std / math.sqrt(x.size), k
    assert np.std(x) == pytest.approx(std, rel=0.05), k
  assert np.std(np.asarray(model.text_proj.kernel[...])) == pytest.approx(width ** -0.5, rel=0.1)
  xavier = _model(**{'model.text.width': width, 'model.text.mlp_dim': 512, 'model.text.num_heads': 4})  # default
  fc1 = np.asarray(xavier.text.encoder.blocks[0].mlp.fc1.kernel[...])
  assert np.std(fc1) == pytest.approx(math.sqrt(2 / (width + 512)), rel=0.05)  # Glorot


def test_gelu_and_layernorm_eps_follow_the_arch():
  from vlp.models import layers
  x = np.linspace(-4, 4, 101, dtype=np.float32)
  erf = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))  # the exact GELU
  tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  np.testing.assert_allclose(layers.Arch(gelu='erf').activation(jnp.asarray(x)), erf, atol=1e-6)
  np.testing.assert_allclose(layers.Arch(gelu='tanh').activation(jnp.asarray(x)), tanh, atol=1e-6)
  assert not np.allclose(erf, tanh, atol=1e-4)
  model = _model(**{'model.arch.ln_eps': 1e-3})
  ln = model.text.encoder.blocks[0].ln1
  assert ln.eps == 1e-3
  v = np.array([[0.01, -0.01, 0.02, -0.02]], np.float32)  # small variance: eps shows
  mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
  ln_small = layers.LayerNorm(4, rngs=nnx.Rngs(0), eps=1e-3)
  np.testing.assert_allclose(ln_small(jnp.asarray(v)), (v - mu) / np.sqrt(var + 1e-3), atol=1e-5)


def test_every_matrix_has_logical_axis_names():
  _, state = nnx.split(nnx.eval_shape(lambda: _model()), nnx.Param)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  shapes = nnx.to_pure_dict(state)
  for (path, spec), (_, x) in zip(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0],
                                  jax.tree_util.tree_flatten_with_path(shapes)[0]):
    if x.ndim >= 1:
      assert len(spec) == x.ndim, (path, spec)  # every axis named (None = never sharded)
    if x.ndim >= 2 and not path[-1].key.endswith('bias'):
      assert 'embed' in spec, (path, spec)  # so FSDP shards every weight matrix


def _erf_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


@pytest.mark.parametrize('recipe', ['albef', 'imp'])
def test_every_block_of_albef_and_imp_follows_the_arch(recipe):
  """model.arch reaches every LayerNorm and every GELU of ALBEF's text and fusion stack and MLM
  head and of IMP's encoder, MoE experts included, and CLIP's init their cross-attention."""
  from test_agd import imp_config
  from vlp.models import layers, moe
  arch = {'gelu': 'erf', 'ln_eps': 1e-5, 'init': 'clip'}
  if recipe == 'albef':
    c = tiny_config('albef', **{'model.text.depth': 3, 'model.fusion_layer': 1},
                    **{f'model.arch.{k}': v for k, v in arch.items()})
    c.model.text.moe.update(num_experts=2, every=2)
  else:
    c = imp_config()
    c.model.arch.update(arch)
    c.model.encoder.moe.update(num_experts=2, every=1, last=1)
  model = build_model(c.model)
  modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
  norms = [m for m in modules if isinstance(m, layers.LayerNorm)]
  assert norms and all(m.eps == 1e-5 for m in norms), sorted({m.eps for m in norms})
  x = np.linspace(-4, 4, 33, dtype=np.float32)
  activations = [m.arch.activation for m in modules if isinstance(m, layers.Mlp)]
  activations += [m.activation for m in modules if isinstance(m, moe.MoeMlp)]
  assert len(activations) >= 2 and any(isinstance(m, moe.MoeMlp) for m in modules)
  for act in activations:
    np.testing.assert_allclose(act(jnp.asarray(x)), _erf_gelu(x), atol=1e-6)
  if recipe == 'albef':
    np.testing.assert_allclose(model.mlm_head.arch.activation(jnp.asarray(x)), _erf_gelu(x), atol=1e-6)
    width = c.model.text.width
    cross = [m for m in modules if isinstance(m, layers.CrossAttention)]
    assert cross and np.std(np.asarray(cross[0].q[...])) == pytest.approx(width ** -0.5, rel=0.1)
