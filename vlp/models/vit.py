"""ViT image tower: patch embedding, CLS token, learned position embeddings.

Position embeddings are stored for the configured grid and bilinearly resized
when an image of another resolution comes in, so one model serves any size.
The CLS token has no position embedding of its own (a learnt constant either
way: CLIP's class embedding plus its position embedding is this `cls`).
CLIP's tower: `ln_pre` (a LayerNorm before the encoder) and a patch embedding
without bias (`patch_bias=False`). SigLIP's: no CLS token (`cls_token=False`) and
`pool='map'`, a learnt probe attending to the patch tokens (MapHead).
"""
import einops
import jax
import jax.numpy as jnp
from flax import nnx

from vlp.core import pixels
from vlp.models import layers


def grid_positions(pos, grid_h: int, grid_w: int):
  """Position embeddings [h, w, D] learnt for one grid, bilinearly resized to another -> [(h w), D]."""
  if pos.shape[:2] != (grid_h, grid_w):
    pos = jax.image.resize(pos, (grid_h, grid_w, pos.shape[-1]), method='bilinear')
  return einops.rearrange(pos, 'h w d -> (h w) d')


POOLS = ('cls', 'gap', 'map')  # the CLS token, the mean of the patch tokens, attention pooling


class MapHead(nnx.Module):
  """Multi-head attention pooling (big_vision's MAPHead, SigLIP's head): one learnt probe
  attends to the tokens, then a residual MLP on its LayerNorm."""

  def __init__(self, width, num_heads, mlp_dim, *, rngs, dtype=jnp.float32, arch=layers.Arch()):
    self.probe = layers.param(rngs, nnx.initializers.xavier_uniform(), (1, width), (None, 'embed'))
    self.attn = layers.CrossAttention(width, width, num_heads, rngs=rngs, dtype=dtype, arch=arch)
    self.ln = layers.LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps)
    self.mlp = layers.Mlp(width, mlp_dim, rngs=rngs, dtype=dtype, arch=arch)

  def __call__(self, x):
    """x: [B, S, W] -> [B, W]."""
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    y = self.attn(probe, x)
    return (y + self.mlp(self.ln(y)))[:, 0]


class ViT(nnx.Module):

  def __init__(self, image_size, patch_size, width, depth, num_heads, mlp_dim, pool='cls', ln_pre=False,
               patch_bias=True, cls_token=True, *, rngs, dtype=jnp.float32, remat='none', scan=False,
               moe=None, arch=layers.Arch()):
    self.patch_size, self.pool, self.dtype = patch_size, pool, dtype
    grid = image_size // patch_size
    self.patch_embed = layers.Dense(3 * patch_size * patch_size, width, ('patch', 'embed'),
                                    rngs=rngs, dtype=dtype, use_bias=patch_bias)
    self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.02), (grid, grid, width),
                                  (None, None, 'embed'))
    self.cls = layers.param(rngs, nnx.initializers.zeros, (width,), ('embed',)) if cls_token else None
    self.ln_pre = layers.LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps) if ln_pre else None
    self.encoder = layers.Encoder(width, depth, num_heads, mlp_dim, rngs=rngs, dtype=dtype, remat=remat, scan=scan,
                                  moe=moe, arch=arch)
    self.map_head = (MapHead(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype, arch=arch) if pool == 'map'
                     else None)

  def position_embeddings(self, grid_h, grid_w):
    return grid_positions(self.pos_embed[...], grid_h, grid_w)

  def __call__(self, images):
    """images: float [B, H, W, 3] -> pooled features [B, width]."""
    if self.pool == 'cls':  # the CLS token's output alone (vlp.models.layers.Encoder's keep)
      return self.tokens(images, keep=0)
    return self.pool_tokens(self.tokens(images))

  def pool_tokens(self, x):
    if self.pool == 'cls':
      return x[:, 0]
    patches = x if self.cls is None else x[:, 1:]
    return patches.mean(axis=1) if self.pool == 'gap' else self.map_head(patches)

  def tokens(self, images, keep=None):
    """images: float [B, H, W, 3] in [-1, 1], or uint8 pixels (normalised here) -> encoded tokens
    [B, 1 + patches, width], CLS first (without a CLS token: [B, patches, width]); with keep (a
    position), that token's alone, [B, width]."""
    images = pixels.model_input(images)  # uint8 would otherwise be read as 0..255
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by patch size {p}')
    patches = einops.rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)', p=p, q=p)
    x = self.patch_embed(patches) + self.position_embeddings(images.shape[1] // p, images.shape[2] // p).astype(self.dtype)
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
      x = jnp.concatenate([cls, x], axis=1)
    return self.encoder(x if self.ln_pre is None else self.ln_pre(x), keep=keep)
