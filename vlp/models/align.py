"""ALIGN-style dual encoder: a ViT and a text Transformer with linear projections to one
embedding space, and the learnt temperature (and, for SigLIP's sigmoid head, bias) of the
contrastive loss. How it is trained lives in vlp.recipes.align."""
import math

import jax.numpy as jnp
from flax import nnx

from vlp.models import layers
from vlp.models.text import TextEncoder
from vlp.models.vit import ViT


class Model(nnx.Module):

  def __init__(self, cfg, *, rngs):
    dtype = jnp.dtype(cfg.dtype)
    remat = cfg.get('remat', 'none')  # exported configs of inference models have no remat
    self.image = ViT(**cfg.image, rngs=rngs, dtype=dtype, remat=remat)
    self.text = TextEncoder(**cfg.text, rngs=rngs, dtype=dtype, remat=remat)
    self.image_proj = layers.Dense(cfg.image.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs,
                                   use_bias=False, dtype=dtype)
    self.text_proj = layers.Dense(cfg.text.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs,
                                  use_bias=False, dtype=dtype)
    self.head = cfg.head
    # logit_scale = exp(t). ALIGN learns the temperature from 1.0 (t = 0);
    # SigLIP starts at t' = log 10 with bias -10.
    t0 = 0.0 if cfg.head == 'softmax' else math.log(10.0)
    self.log_scale = nnx.Param(jnp.asarray(t0, jnp.float32))
    self.bias = nnx.Param(jnp.asarray(-10.0, jnp.float32)) if cfg.head == 'sigmoid' else None

  def encode_image(self, images):
    return layers.l2_normalize(self.image_proj(self.image(images)))

  def encode_text(self, tokens):
    return layers.l2_normalize(self.text_proj(self.text(tokens)))

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)

  def logit_scale(self):
    return jnp.exp(self.log_scale[...])

  def logit_bias(self):
    return self.bias[...] if self.bias is not None else None
