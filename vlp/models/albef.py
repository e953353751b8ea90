"""ALBEF (Li et al. 2021): align before fuse, with momentum distillation.

Follows salesforce/ALBEF `models/model_pretrain.py`: a ViT image encoder; one
BERT-style text stack split at `fusion_layer` (layers below it encode text
alone, layers from it on add cross-attention to the image tokens); 256-d
L2-normalised projections of both CLS tokens for ITC; a 2-way ITM head on the
fusion CLS; an MLM head tied to the token embedding. The text stack is
pre-LayerNorm as the rest of vlp, or with `model.text.post_ln` BERT's layout
(post-LN blocks, a LayerNorm on the embeddings, no final one), so that it can
start from a BERT import as ALBEF starts from bert-base
(`init.text_from`, vlp.recipes.albef).

How it is trained (momentum model, queues, the three losses) lives in
vlp.recipes.albef.
"""
import jax.numpy as jnp
from flax import nnx

from vlp.models import layers
from vlp.models.text import PAD_ID
from vlp.models.vit import ViT

TEMP_RANGE = (0.001, 0.5)  # ALBEF clamps its learnt temperature to this range


class TextStack(nnx.Module):
  """Token + position embeddings, `fusion_layer` text-only blocks, then fusion blocks;
  `moe` (model.text.moe) picks MoE blocks over the whole stack of `depth` blocks. `post_ln`:
  BERT's layout, the embeddings layer-normalised and every block post-LN (so no final
  LayerNorm). BERT's token-type embedding of segment 0, the only segment captions have, is a
  part of the position embedding (vlp.interop.hf_bert folds it in)."""

  def __init__(self, vocab_size, context_length, width, depth, num_heads, mlp_dim, *,
               fusion_layer, image_width, rngs, dtype=jnp.float32, remat='none', scan=False, moe=None,
               arch=layers.Arch(),
               post_ln=False):
    self.dtype, self.remat, self.scan = dtype, remat, scan
    self.token_embed = layers.param(rngs, nnx.initializers.normal(0.02), (vocab_size, width),
                                    ('vocab', 'embed'))
    self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.01), (context_length, width),
                                  (None, 'embed'))
    norm = lambda: layers.LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps)
    self.embed_ln = norm() if post_ln else None
    experts = [layers.moe_kwargs(moe) if is_moe else None for is_moe in layers.moe_blocks(depth, moe)]
    self.text_blocks = layers.block_stack([
        layers.Block(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype, moe=experts[i], arch=arch, depth=depth,
                     post_ln=post_ln)
        for i in range(fusion_layer)], scan)
    self.text_ln = None if post_ln else norm()
    self.fusion_blocks = layers.block_stack([
        layers.FusionBlock(width, num_heads, mlp_dim, image_width, rngs=rngs, dtype=dtype, moe=experts[i],
                           arch=arch, depth=depth, post_ln=post_ln)
        for i in range(fusion_layer, depth)], scan)
    self.fusion_ln = None if post_ln else norm()

  def encode(self, tokens):
    """int [B, L] -> text-only hidden states [B, L, width] (the text encoder's output)."""
    length = tokens.shape[1]
    if length > self.pos_embed.shape[0]:
      raise ValueError(f'text length {length} exceeds context_length {self.pos_embed.shape[0]}')
    x = (jnp.take(self.token_embed[...], tokens, axis=0) + self.pos_embed[...][:length]).astype(self.dtype)
    if self.embed_ln is not None:
      x = self.embed_ln(x)
    x = layers.run_blocks(self.text_blocks, x, tokens != PAD_ID, remat=self.remat)
    return x if self.text_ln is None else self.text_ln(x)

  def fuse(self, text_hidden, mask, image_tokens):
    """Fusion encoder: text hidden states [B, L, D] attend to image tokens [B, S, D_img]."""
    x = layers.run_blocks(self.fusion_blocks, text_hidden, mask, image_tokens, remat=self.remat)
    return x if self.fusion_ln is None else self.fusion_ln(x)


class MlmHead(nnx.Module):
  """BERT's prediction head: dense + GELU + LayerNorm, decoder tied to the token embedding."""

  def __init__(self, width, vocab_size, *, rngs, dtype=jnp.float32, arch=layers.Arch()):
    self.dense = layers.Dense(width, width, ('embed', None), rngs=rngs, dtype=dtype)
    self.ln = layers.LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps)
    self.bias = layers.param(rngs, nnx.initializers.zeros, (vocab_size,), ('vocab',))
    self.dtype, self.arch = dtype, arch

  def __call__(self, x, token_embed):
    h = self.ln(self.arch.activation(self.dense(x)))
    return jnp.einsum('bld,vd->blv', h, token_embed.astype(self.dtype)) + self.bias[...].astype(self.dtype)


class Model(nnx.Module):

  def __init__(self, cfg, *, rngs):
    dtype = jnp.dtype(cfg.dtype)
    stack, arch = layers.stacking(cfg), layers.arch_of(cfg)
    self.image = ViT(**cfg.image, rngs=rngs, dtype=dtype, **stack, arch=arch)
    self.text = TextStack(**cfg.text, fusion_layer=cfg.fusion_layer, image_width=cfg.image.width,
                          rngs=rngs, dtype=dtype, **stack, arch=arch)
    self.image_proj = layers.Dense(cfg.image.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs, dtype=dtype)
    self.text_proj = layers.Dense(cfg.text.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs, dtype=dtype)
    self.itm_head = layers.Dense(cfg.text.width, 2, ('embed', None), rngs=rngs, dtype=dtype)
    self.mlm_head = MlmHead(cfg.text.width, cfg.text.vocab_size, rngs=rngs, dtype=dtype, arch=arch)
    self.temp = nnx.Param(jnp.asarray(0.07, jnp.float32))

  def image_feat(self, image_tokens):
    return layers.l2_normalize(self.image_proj(self.image.pool_tokens(image_tokens)))

  def text_feat(self, text_hidden):
    return layers.l2_normalize(self.text_proj(text_hidden[:, 0]))

  def encode_image(self, images):
    return self.image_feat(self.image.tokens(images))

  def encode_text(self, tokens):
    return self.text_feat(self.text.encode(tokens))

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)

  def itm_logits(self, text_hidden, mask, image_tokens):
    """[B, 2] match logits (1 = the text describes the image) of text/image pairs."""
    return self.itm_head(self.text.fuse(text_hidden, mask, image_tokens)[:, 0]).astype(jnp.float32)

  def mlm_logits(self, tokens, image_tokens):
    """[B, L, vocab] logits of the whole text stack on (masked) tokens, conditioned on the image."""
    fused = self.text.fuse(self.text.encode(tokens), tokens != PAD_ID, image_tokens)
    return self.mlm_head(fused, self.text.token_embed[...])
