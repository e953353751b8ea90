"""Analytic FLOPs of the Transformer layers and towers (the numerator of MFU); each recipe sums
its model's from these (vlp.recipes.*.flops, the recipe's train_flops).

Convention (the one of PaLM/MaxText "model FLOPs"):
  * every matmul (m x k) @ (k x n) costs 2*m*n*k FLOPs;
  * counted: patch embedding, Q/K/V and output projections, attention scores
    (Q K^T) and attention-weighted values (A V), both MLP matmuls, the final
    linear projections to `embed_dim`, and the B x B logits of the
    contrastive loss (counted once: t2i logits are the transpose of i2t);
  * not counted: token-embedding lookup (a gather), layer norms, softmax,
    GELU, residual adds, biases, the optimizer update (all O(params) or
    O(tokens * width), < ~2% here);
  * attention is counted dense (S x S) even when causal, because that is what
    the kernels compute;
  * a tower pooled at one token (the ViT at 'cls', the text tower at any of its
    pools) runs its last block for that token alone, keys and values excepted
    (vlp.models.layers.Encoder's keep): only that is counted, the FLOPs the model
    needs. open_clip and big_vision compute the whole block, more work for the
    same result;
  * training = 3 x forward (backward = 2 x forward: grads w.r.t. activations
    and w.r.t. weights). No rematerialisation is counted (model FLOPs, not
    hardware FLOPs).

Model configs are ml_collections ConfigDicts (or plain dicts / objects) with
the layout of `configs/*.py`:
  model.image: image_size, patch_size, width, depth, num_heads, mlp_dim, [moe]
  model.text:  vocab_size, context_length, width, depth, num_heads, mlp_dim, [moe]
  model.embed_dim
The ViT has a CLS token (seq = patches + 1); the text tower's sequence length
is `context_length` (set `seq_len` in the text config to override, e.g. when
an extra CLS token is appended).
"""
from __future__ import annotations

from typing import Any

from vlp.models.layers import moe_blocks
from vlp.models.moe import capacity


def field(cfg: Any, key: str, default: Any = None) -> Any:
  """A key of a config given as a ConfigDict, a plain dict or an object."""
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  try:
    return getattr(cfg, key)
  except (AttributeError, KeyError):
    return default


def matmul_flops(m: int, n: int, k: int) -> float:
  """(m x k) @ (k x n)."""
  return 2.0 * m * n * k


def block_forward_flops(seq_len: int, width: int, mlp_dim: int) -> float:
  """One pre-LN Transformer encoder block on one sequence (self-attention).

  The head count does not change the FLOPs: heads * (S x S x head_dim) = S*S*W.
  """
  s, w, m = seq_len, width, mlp_dim
  qkv = 3 * matmul_flops(s, w, w)
  scores = matmul_flops(s, s, w)       # Q K^T over all heads
  values = matmul_flops(s, w, s)       # A V over all heads
  out = matmul_flops(s, w, w)
  mlp = matmul_flops(s, m, w) + matmul_flops(s, w, m)
  return qkv + scores + values + out + mlp


def pooled_block_forward_flops(seq_len: int, width: int, mlp_dim: int) -> float:
  """A last block whose output is wanted at one token: keys and values of every token, the
  rest for that token alone."""
  s, w, m = seq_len, width, mlp_dim
  keys_values = 2 * matmul_flops(s, w, w)
  query_out = 2 * matmul_flops(1, w, w)
  scores_values = matmul_flops(1, s, w) + matmul_flops(1, w, s)
  mlp = matmul_flops(1, m, w) + matmul_flops(1, w, m)
  return keys_values + query_out + scores_values + mlp


def moe_mlp_forward_flops(seq_len: int, width: int, mlp_dim: int, moe: Any) -> float:
  """An MoE MLP on one sequence (one routing group): router logits, the
  dispatch and combine einsums, and both expert matmuls over every slot
  (E x C, filled or not: that is what the kernels compute)."""
  e = field(moe, "num_experts")
  slots = e * capacity(field(moe, "router"), seq_len, e, field(moe, "k"), field(moe, "capacity_factor"))
  router = matmul_flops(seq_len, e, width)
  dispatch_combine = 2 * matmul_flops(slots, width, seq_len)
  experts = matmul_flops(slots, mlp_dim, width) + matmul_flops(slots, width, mlp_dim)
  return router + dispatch_combine + experts


def encoder_forward_flops(seq_len: int, width: int, depth: int,
                          mlp_dim: int, moe: Any = None, pooled: bool = False) -> float:
  """The stack's blocks; those that `moe` makes Mixture-of-Experts (vlp.models.layers.moe_blocks)
  count moe_mlp_forward_flops instead of the dense MLP; `pooled`: the output is wanted at one
  token, so a dense last block counts pooled_block_forward_flops."""
  dense = block_forward_flops(seq_len, width, mlp_dim)
  total = 0.0
  experts = moe_blocks(depth, moe)
  for i, is_moe in enumerate(experts):
    last_pooled = pooled and i == depth - 1 and not is_moe
    total += pooled_block_forward_flops(seq_len, width, mlp_dim) if last_pooled else dense
    if is_moe:
      total += (moe_mlp_forward_flops(seq_len, width, mlp_dim, moe)
                - 2 * matmul_flops(seq_len, mlp_dim, width))
  return total


def vit_seq_len(image_cfg: Any) -> int:
  size, patch = field(image_cfg, "image_size"), field(image_cfg, "patch_size")
  num_patches = (size // patch) ** 2
  return num_patches + (1 if field(image_cfg, "cls_token", True) else 0)


def vit_pools_one_token(image_cfg: Any) -> bool:
  """Whether the ViT's pooled feature is one token's ('cls'), so its last block runs for that
  token alone (vlp.models.vit.ViT); the text tower's pools all are."""
  return field(image_cfg, "pool", "cls") == "cls"


def vit_forward_flops(image_cfg: Any, embed_dim: int, channels: int = 3, tokens_out: bool = False) -> float:
  """Forward FLOPs of the image tower for ONE example (incl. projection); tokens_out: every
  token's output is used (ALBEF's fusion), not the pooled feature alone."""
  size, patch = field(image_cfg, "image_size"), field(image_cfg, "patch_size")
  width = field(image_cfg, "width")
  num_patches = (size // patch) ** 2
  patch_embed = matmul_flops(num_patches, width, patch * patch * channels)
  blocks = encoder_forward_flops(vit_seq_len(image_cfg), width,
                                 field(image_cfg, "depth"),
                                 field(image_cfg, "mlp_dim"), field(image_cfg, "moe"),
                                 pooled=not tokens_out and vit_pools_one_token(image_cfg))
  proj = matmul_flops(1, embed_dim, width) if embed_dim else 0.0
  pool = 0.0
  if field(image_cfg, "pool") == "map":  # the probe's attention to the patches, then its MLP
    pool = (cross_attention_forward_flops(1, num_patches, width, width)
            + 2 * matmul_flops(1, field(image_cfg, "mlp_dim"), width))
  return patch_embed + blocks + pool + proj


def text_forward_flops(text_cfg: Any, embed_dim: int) -> float:
  """Forward FLOPs of the text tower for ONE example (incl. projection); every pool of the
  text tower (vlp.models.text.POOLS) is one token's."""
  seq = field(text_cfg, "seq_len") or field(text_cfg, "context_length")
  width = field(text_cfg, "width")
  blocks = encoder_forward_flops(seq, width, field(text_cfg, "depth"),
                                 field(text_cfg, "mlp_dim"), field(text_cfg, "moe"), pooled=True)
  proj = matmul_flops(1, embed_dim, width) if embed_dim else 0.0
  return blocks + proj


def contrastive_logits_flops(batch_size: int, embed_dim: int) -> float:
  """The B x B similarity matrix of the (global) batch."""
  return matmul_flops(batch_size, batch_size, embed_dim)


def cross_attention_forward_flops(q_len: int, kv_len: int, width: int, kv_width: int) -> float:
  """Q projection, K/V projections of the other sequence, scores, values, output projection."""
  s, t, w = q_len, kv_len, width
  return (matmul_flops(s, w, w) + 2 * matmul_flops(t, w, kv_width) + matmul_flops(s, t, w)
          + matmul_flops(s, w, t) + matmul_flops(s, w, w))
