"""IMP (Akbari et al. 2023): one modality-agnostic Transformer for images, video and text.

Thin per-modality embedders turn an input into tokens of one width (image
patches, video tubelets of `tubelet_size` frames, text tokens), each with its
position embeddings and a learnt modality embedding; the same encoder
(`model.encoder`, Mixture-of-Experts blocks where `model.encoder.moe` says)
encodes them all; per-modality pooling (mean over vision tokens, the CLS
token of text) and projection heads give L2-normalised embeddings.

Objectives, one per task of the alternating-gradient schedule (trained by
vlp.recipes.imp):
  contrastive     softmax NCE between a vision modality and text, with the
                  pair's own learnt temperature (scale_image_text, scale_video_text);
  classification  cross-entropy over the class names put in prompts and
                  embedded by the text path, with its own temperature: the
                  trained classifier *is* zero-shot classification, so the
                  same class names (or any others) serve zero-shot evaluation.
DropToken: in training a task may drop a random share of its vision tokens per
example before the encoder (IMP: 75% of video tokens), so video costs what an
image costs.
"""
import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from vlp.core import pixels
from vlp.models import layers
from vlp.models.text import PAD_ID
from vlp.models.vit import grid_positions

SCALES = ('image_text', 'video_text', 'image_class', 'video_class')
INIT_LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature


def _modality_embedding(rngs, width):
  return layers.param(rngs, nnx.initializers.normal(0.02), (width,), ('embed',))


class ImageEmbed(nnx.Module):
  """images [B, H, W, 3] -> patch tokens [B, (H/p)(W/p), D]; any size divisible by p."""

  def __init__(self, patch_size, image_size, width, *, rngs, dtype=jnp.float32):
    grid = image_size // patch_size
    self.patch_size, self.dtype = patch_size, dtype
    self.proj = layers.Dense(3 * patch_size ** 2, width, ('patch', 'embed'), rngs=rngs, dtype=dtype)
    self.pos = layers.param(rngs, nnx.initializers.normal(0.02), (grid, grid, width), (None, None, 'embed'))
    self.modality = _modality_embedding(rngs, width)

  def __call__(self, images):
    images = pixels.model_input(images)  # uint8 pixels (normalised here) or floats in [-1, 1]
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch size {p}')
    patches = einops.rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)', p=p, q=p)
    pos = grid_positions(self.pos[...], images.shape[1] // p, images.shape[2] // p) + self.modality[...]
    return self.proj(patches) + pos.astype(self.dtype)


class VideoEmbed(nnx.Module):
  """video [B, T, H, W, 3] -> tubelet tokens [B, (T/t)(H/p)(W/p), D]; separable space and
  time position embeddings, each resized to the clip's grid."""

  def __init__(self, patch_size, tubelet_size, image_size, frames, width, *, rngs, dtype=jnp.float32):
    grid = image_size // patch_size
    self.patch_size, self.tubelet_size, self.dtype = patch_size, tubelet_size, dtype
    self.proj = layers.Dense(3 * tubelet_size * patch_size ** 2, width, ('patch', 'embed'), rngs=rngs, dtype=dtype)
    self.pos = layers.param(rngs, nnx.initializers.normal(0.02), (grid, grid, width), (None, None, 'embed'))
    self.time = layers.param(rngs, nnx.initializers.normal(0.02), (frames // tubelet_size, width), (None, 'embed'))
    self.modality = _modality_embedding(rngs, width)

  def __call__(self, video):
    video = pixels.model_input(video)  # uint8 pixels (normalised here) or floats in [-1, 1]
    p, t = self.patch_size, self.tubelet_size
    if video.shape[1] % t or video.shape[2] % p or video.shape[3] % p:
      raise ValueError(f'clip of shape {video.shape[1:4]} does not split into tubelets of {t}x{p}x{p}')
    tubes = einops.rearrange(video, 'b (n t) (h p) (w q) c -> b n (h w) (t p q c)', t=t, p=p, q=p)
    n = tubes.shape[1]
    time = self.time[...]
    if time.shape[0] != n:
      time = jax.image.resize(time, (n, time.shape[1]), method='linear')
    space = grid_positions(self.pos[...], video.shape[2] // p, video.shape[3] // p)
    pos = space[None] + time[:, None] + self.modality[...]
    return einops.rearrange(self.proj(tubes) + pos.astype(self.dtype), 'b n s d -> b (n s) d')


class TextEmbed(nnx.Module):
  """tokens [B, L] ([CLS] ... [SEP] PAD...) -> [B, L, D]."""

  def __init__(self, vocab_size, context_length, width, *, rngs, dtype=jnp.float32):
    self.dtype = dtype
    self.token = layers.param(rngs, nnx.initializers.normal(0.02), (vocab_size, width), ('vocab', 'embed'))
    self.pos = layers.param(rngs, nnx.initializers.normal(0.01), (context_length, width), (None, 'embed'))
    self.modality = _modality_embedding(rngs, width)

  def __call__(self, tokens):
    length = tokens.shape[1]
    if length > self.pos.shape[0]:
      raise ValueError(f'text length {length} exceeds context_length {self.pos.shape[0]}')
    x = jnp.take(self.token[...], tokens, axis=0) + self.pos[...][:length] + self.modality[...]
    return x.astype(self.dtype)


def drop_tokens(x, rate: float, key):
  """Keeps a random round((1 - rate) N) of the N tokens of every example (DropToken), in order."""
  n = x.shape[1]
  keep = max(1, round(n * (1.0 - rate)))
  if keep == n:
    return x
  idx = jnp.sort(jnp.argsort(jax.random.uniform(key, x.shape[:2]), axis=1)[:, :keep], axis=1)
  return jnp.take_along_axis(x, idx[..., None], axis=1)


class Model(nnx.Module):

  def __init__(self, cfg, *, rngs):
    dtype = jnp.dtype(cfg.dtype)
    enc = cfg.encoder
    width, patch, size = enc.width, cfg.image.patch_size, cfg.image.image_size
    self.image_embed = ImageEmbed(patch, size, width, rngs=rngs, dtype=dtype)
    self.video_embed = VideoEmbed(patch, cfg.video.tubelet_size, size, cfg.video.frames, width, rngs=rngs,
                                  dtype=dtype)
    self.text_embed = TextEmbed(cfg.text.vocab_size, cfg.text.context_length, width, rngs=rngs, dtype=dtype)
    self.encoder = layers.Encoder(width, enc.depth, enc.num_heads, enc.mlp_dim, rngs=rngs, dtype=dtype,
                                  **layers.stacking(cfg), moe=enc.moe, qk_norm=enc.qk_layernorm,
                                  arch=layers.arch_of(cfg))
    head = lambda: layers.Dense(width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs, use_bias=False, dtype=dtype)
    self.image_head, self.video_head, self.text_head = head(), head(), head()
    for name in SCALES:  # top-level params of their own: a task touches only its own
      setattr(self, f'scale_{name}', nnx.Param(jnp.asarray(math.log(INIT_LOGIT_SCALE), jnp.float32)))

  def encode(self, modality: str, x, drop_rate: float = 0.0, key=None):
    """L2-normalised embeddings [B, embed_dim] of images, video or tokens."""
    tokens = getattr(self, f'{modality}_embed')(x)
    mask = x != PAD_ID if modality == 'text' else None
    if drop_rate and modality != 'text':
      tokens = drop_tokens(tokens, drop_rate, key)
    hidden = self.encoder(tokens, mask)
    pooled = hidden[:, 0] if modality == 'text' else hidden.mean(axis=1)
    return layers.l2_normalize(getattr(self, f'{modality}_head')(pooled))

  def encode_image(self, images):
    return self.encode('image', images)

  def encode_video(self, video):
    return self.encode('video', video)

  def encode_text(self, tokens):
    return self.encode('text', tokens)

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)

  def logit_scale(self, name: str):
    return jnp.minimum(jnp.exp(getattr(self, f'scale_{name}')[...]), layers.MAX_LOGIT_SCALE)


def class_embeddings(model, prompts, num_classes: int):
  """The classifier: mean over templates of the prompts' text embeddings, re-normalised."""
  emb = model.encode_text(prompts)
  emb = emb.reshape(num_classes, -1, emb.shape[-1])
  return layers.l2_normalize(emb.mean(axis=1))
