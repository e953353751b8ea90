"""ALIGN-style dual encoder: a ViT and a text Transformer with linear projections to one
embedding space, and the learnt temperature (and, for SigLIP's sigmoid head, bias) of the
contrastive loss. How it is trained lives in vlp.recipes.align.

The temperature starts at `model.logit_scale_init` (0: the head's own start, CLIP's 1/0.07
for softmax and SigLIP's 10 for sigmoid; ALIGN's paper starts at 1.0, which a small batch
learns far too slowly), the sigmoid bias at `model.logit_bias_init`. SigLIP's layout has no
image projection (`model.image_proj=False`: the pooled image feature is the embedding) and a
bias on the text projection (`model.proj_bias=True`)."""
import math

import jax.numpy as jnp
from flax import nnx

from vlp.models import layers
from vlp.models.text import TextEncoder
from vlp.models.vit import ViT

DEFAULT_SCALE = {'softmax': 1 / 0.07, 'sigmoid': 10.0}  # CLIP's and SigLIP's starting temperature


class Model(nnx.Module):

  def __init__(self, cfg, *, rngs):
    dtype = jnp.dtype(cfg.dtype)
    stack, arch = layers.stacking(cfg), layers.arch_of(cfg)
    self.image = ViT(**cfg.image, rngs=rngs, dtype=dtype, **stack, arch=arch)
    self.text = TextEncoder(**cfg.text, rngs=rngs, dtype=dtype, **stack, arch=arch)
    proj = lambda width: layers.Dense(width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs,
                                      use_bias=cfg.get('proj_bias', False), dtype=dtype,
                                      init=arch.kernel('proj', width, 1, None))
    self.image_proj = proj(cfg.image.width) if cfg.get('image_proj', True) else None
    self.text_proj = proj(cfg.text.width)
    self.head = cfg.head
    scale0 = cfg.get('logit_scale_init') or DEFAULT_SCALE[cfg.head]
    self.log_scale = nnx.Param(jnp.asarray(math.log(scale0), jnp.float32))  # logit_scale = exp(log_scale)
    self.bias = (nnx.Param(jnp.asarray(cfg.get('logit_bias_init', -10.0), jnp.float32))
                 if cfg.head == 'sigmoid' else None)

  def encode_image(self, images):
    return layers.l2_normalize(self.project(images, None)[0])

  def encode_text(self, tokens):
    return layers.l2_normalize(self.project(None, tokens)[1])

  def project(self, images, tokens):
    """The embeddings before normalisation (their norms are a health metric); None skips a tower."""
    image_proj = self.image_proj or (lambda x: x)
    return (None if images is None else image_proj(self.image(images)),
            None if tokens is None else self.text_proj(self.text(tokens)))

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)

  def logit_scale(self):
    return jnp.exp(self.log_scale[...])

  def logit_bias(self):
    return self.bias[...] if self.bias is not None else None
