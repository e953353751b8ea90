"""A model family that lives outside vlp/: a bag of patches against a bag of words.

The recipe of docs/models.md's "Adding a model": its config section, its model, its
loss. Everything else (plan, input pipeline, compiled step, checkpoints,
evaluators) is vlp's, through the protocol's defaults.
"""
import jax.numpy as jnp
from flax import nnx

from vlp import losses, recipes
from vlp.models import layers
from vlp.models.text import PAD_ID


class BagModel(nnx.Module):
  """Mean of linearly embedded patches; mean of embedded tokens; both L2-normalised."""

  def __init__(self, cfg, *, rngs):
    p = cfg.image.patch_size
    self.patch_size = p
    self.patch = layers.Dense(3 * p * p, cfg.embed_dim, ('patch', 'embed'), rngs=rngs)
    self.tokens = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.text.vocab_size, cfg.embed_dim),
                               ('vocab', 'embed'))
    self.log_scale = nnx.Param(jnp.asarray(jnp.log(10.0), jnp.float32))

  def encode_image(self, images):
    b, h, w, _ = images.shape
    p = self.patch_size
    patches = images.reshape(b, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, 3 * p * p)
    return layers.l2_normalize(self.patch(patches).mean(axis=1))

  def encode_text(self, tokens):
    mask = (tokens != PAD_ID)[..., None]
    summed = (jnp.take(self.tokens[...], tokens, axis=0) * mask).sum(axis=1)
    return layers.l2_normalize(summed / jnp.maximum(mask.sum(axis=1), 1))


class BagOfWords(recipes.Recipe):
  name = 'bag_of_words'

  def config_sections(self):
    return {'model': dict(image=dict(image_size=16, patch_size=4), text=dict(vocab_size=1024, context_length=16),
                          embed_dim=32)}

  def build(self, model_cfg, seed=0):
    return BagModel(model_cfg, rngs=nnx.Rngs(seed))

  def loss(self, graphdef, params, model_state, batch, step, config, variant):
    model = nnx.merge(graphdef, params)
    scale = jnp.exp(model.log_scale[...])
    loss = losses.softmax_contrastive(model.encode_image(batch['image']), model.encode_text(batch['text']), scale)
    return loss, ({'logit_scale': scale}, model_state)


RECIPE = recipes.register(BagOfWords())
