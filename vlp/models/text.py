"""Text tower: token + position embeddings, a Transformer, and one pooled feature.

vlp's captions are laid out `[CLS] tokens [SEP] PAD...` with PAD id 0 (vlp.data.tokenizer);
padding (`pad_id`) is masked out of attention unless `padding_mask=False`. The papers' layouts:
- bidirectional attention pooled at [CLS] (BERT, ALIGN);
- causal attention pooled at the caption's end token (CLIP's EOT), the only position that
  has seen the whole caption (`pool='eos'`): vlp's own captions at the last token before
  padding; an import's at the first `eos_id` of the row, as transformers' CLIPTextTransformer
  and open_clip's pool_type 'eos' find it (position 0 in a row without one, as theirs);
- `pool='argmax'`: at the highest id of the row, open_clip's default pooling and transformers'
  CLIP with the legacy `eos_token_id == 2` (CLIP's EOT is its highest id);
- SigLIP's: bidirectional, pooled at the last position whether or not it is padding
  (`pool='last'`), with padding attended to as any token (`padding_mask=False`): SigLIP
  was trained on fixed-length padded captions without a mask.
Imports of CLIP leave padding unmasked too (`padding_mask=False`): under causal attention the
end token sees no padding, and CLIP's own vocabulary uses id 0 for a word ('!').
"""
import jax.numpy as jnp
from flax import nnx

from vlp.models import layers

PAD_ID = 0  # vlp's tokenizer's padding
POOLS = ('cls', 'eos', 'last', 'argmax')
NO_EOS = -1  # eos_id of vlp's own captions: pooled at the last token before padding


class TextEncoder(nnx.Module):

  def __init__(self, vocab_size, context_length, width, depth, num_heads, mlp_dim,
               causal=False, pool='cls', padding_mask=True, pad_id=PAD_ID, eos_id=NO_EOS, *, rngs,
               dtype=jnp.float32, remat='none', scan=False, moe=None, arch=layers.Arch()):
    self.dtype, self.causal, self.pool, self.padding_mask = dtype, causal, pool, padding_mask
    self.pad_id, self.eos_id = pad_id, eos_id
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
    mask = tokens != self.pad_id if self.padding_mask else None
    if self.causal:  # query i sees keys j <= i (that are not padding, with padding_mask)
      causal = jnp.tril(jnp.ones((length, length), bool))[None]
      mask = causal if mask is None else mask[:, None, :] & causal
    keep = pooled_position(tokens, self.pool, self.pad_id, self.eos_id)
    return self.encoder(x.astype(self.dtype), mask=mask, keep=keep)  # the pooled token's output alone


def pooled_position(tokens, pool: str, pad_id: int = PAD_ID, eos_id: int = NO_EOS):
  """The position each caption of tokens [B, L] is pooled at: int [B], or one for all."""
  if pool == 'cls':
    return 0
  if pool == 'last':
    return -1
  if pool == 'argmax':  # the first highest id (torch's argmax, as jnp's, takes the first)
    return jnp.argmax(tokens, axis=1)
  if eos_id != NO_EOS:  # the first eos_id; argmax of a row of False is 0, as transformers' is
    return jnp.argmax(tokens == eos_id, axis=1)
  return jnp.maximum(jnp.sum(tokens != pad_id, axis=1) - 1, 0)  # captions padded at their end
