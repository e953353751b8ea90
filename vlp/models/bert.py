"""BERT (Devlin et al. 2019) as transformers' BertModel and BertForMaskedLM compute it: ALBEF's
text stack (vlp.models.albef.TextStack) without fusion layers, in BERT's post-LN layout, with
BertModel's pooler and BertForMaskedLM's prediction head where the source has them.

It is what `vlp import` makes of a transformers BERT directory: a text encoder for ALBEF's
text stack to start from (`init.text_from`), as ALBEF starts from bert-base-uncased.
"""
import jax.numpy as jnp
from flax import nnx

from vlp.models import layers
from vlp.models.albef import MlmHead, TextStack


class Model(nnx.Module):

  def __init__(self, cfg, *, rngs):
    dtype, arch, text = jnp.dtype(cfg.dtype), layers.arch_of(cfg), cfg.text
    self.text = TextStack(**text, fusion_layer=text.depth, image_width=text.width, rngs=rngs, dtype=dtype,
                          **layers.stacking(cfg), arch=arch)
    self.pooler = layers.Dense(text.width, text.width, ('embed', None), rngs=rngs, dtype=dtype) if cfg.pooler else None
    self.mlm_head = MlmHead(text.width, text.vocab_size, rngs=rngs, dtype=dtype, arch=arch) if cfg.mlm_head else None

  def encode_text(self, tokens):
    """int [B, L] -> float32 [B, L, width]: the last hidden states (BertModel's last_hidden_state)."""
    return self.text.encode(tokens).astype(jnp.float32)

  def pooled(self, tokens):
    """[B, width]: BertModel's pooler output, tanh of a dense layer on the [CLS] hidden state."""
    return jnp.tanh(self.pooler(self.text.encode(tokens)[:, 0])).astype(jnp.float32)

  def mlm_logits(self, tokens):
    """[B, L, vocab]: BertForMaskedLM's prediction scores."""
    return self.mlm_head(self.text.encode(tokens), self.text.token_embed[...]).astype(jnp.float32)
