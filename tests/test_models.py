"""Model pieces: any-resolution position embeddings, padding mask, logical axis names."""
import jax
import jax.numpy as jnp
import numpy as np
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
  align, siglip = _model(), _model(**{'model.head': 'sigmoid'})
  assert float(align.logit_scale()) == 1.0 and align.logit_bias() is None  # ALIGN: temperature 1.0
  assert float(siglip.logit_scale()) == np.float32(10.0) and float(siglip.logit_bias()) == -10.0


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
