"""Text tower: token + position embeddings, a Transformer, and one pooled feature.

Inputs are laid out `[CLS] tokens [SEP] PAD...` with PAD id 0 (vlp.data.tokenizer);
padding is masked out of attention unless `padding_mask=False`. The papers' layouts:
- bidirectional attention pooled at [CLS] (BERT, ALIGN);
- causal attention pooled at the last real token, [SEP] (CLIP's EOT), which is the
  only position that has seen the whole caption;
- SigLIP's: bidirectional, pooled at the last position whether or not it is padding
  (`pool='last'`), with padding attended to as any token (`padding_mask=False`): SigLIP
  was trained on fixed-length padded captions without a mask.
"""
import jax.numpy as jnp
from flax import nnx

from vlp.models import layers

PAD_ID = 0
POOLS = ('cls', 'eos', 'last')


class TextEncoder(nnx.Module):

  def __init__(self, vocab_size, context_length, width, depth, num_heads, mlp_dim,
               causal=False, pool='cls', padding_mask=True, *, rngs, dtype=jnp.float32, remat='none',
               scan=False, moe=None, arch=layers.Arch()):
    self.dtype, self.causal, self.pool, self.padding_mask = dtype, causal, pool, padding_mask
    self.token_embed = layers.param(rngs, nnx.initializers.normal(0.02), (vocab_size, width),
                                    ('vocab', 'embed'))
    self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.01), (context_length, width),
                                  (None, 'embed'))
    self.encoder = layers.Encoder(width, depth, num_heads, mlp_dim, rngs=rngs, dtype=dtype, remat=remat,
                                  scan=scan, moe=moe, arch=arch)

  def __call__(self, tokens):
    """tokens: int [B, L] -> pooled features [B, width]."""
    length = tokens.shape[1]
    if length > self.pos_embed.shape[0]:
      raise ValueError(f'text length {length} exceeds context_length {self.pos_embed.shape[0]}')
    x = jnp.take(self.token_embed[...], tokens, axis=0) + self.pos_embed[...][:length]
    real = tokens != PAD_ID
    mask = real if self.padding_mask else None
    if self.causal:  # query i sees keys j <= i (that are not padding, with padding_mask)
      causal = jnp.tril(jnp.ones((length, length), bool))[None]
      mask = causal if mask is None else mask[:, None, :] & causal
    if self.pool == 'eos':  # [SEP]: captions are PAD-padded at the end
      keep = jnp.maximum(jnp.sum(real, axis=1) - 1, 0)
    else:
      keep = 0 if self.pool == 'cls' else -1
    return self.encoder(x.astype(self.dtype), mask=mask, keep=keep)  # the pooled token's output alone
