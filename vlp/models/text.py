"""Text tower: token + position embeddings, bidirectional Transformer, CLS pooling.

Inputs are laid out `[CLS] tokens [SEP] PAD...` with PAD id 0 (vlp.data.tokenizer);
padding is masked out of attention, and the CLS output is the text feature (BERT/ALIGN).
"""
import jax.numpy as jnp
from flax import nnx

from vlp.models import layers

PAD_ID = 0


class TextEncoder(nnx.Module):

  def __init__(self, vocab_size, context_length, width, depth, num_heads, mlp_dim,
               *, rngs, dtype=jnp.float32, remat='none', moe=None):
    self.dtype = dtype
    self.token_embed = layers.param(rngs, nnx.initializers.normal(0.02), (vocab_size, width),
                                    ('vocab', 'embed'))
    self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.01), (context_length, width),
                                  (None, 'embed'))
    self.encoder = layers.Encoder(width, depth, num_heads, mlp_dim, rngs=rngs, dtype=dtype, remat=remat, moe=moe)

  def __call__(self, tokens):
    """tokens: int [B, L] -> pooled features [B, width]."""
    length = tokens.shape[1]
    if length > self.pos_embed.shape[0]:
      raise ValueError(f'text length {length} exceeds context_length {self.pos_embed.shape[0]}')
    x = jnp.take(self.token_embed[...], tokens, axis=0) + self.pos_embed[...][:length]
    x = self.encoder(x.astype(self.dtype), mask=tokens != PAD_ID)
    return x[:, 0]
