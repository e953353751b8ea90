"""Analytic training FLOPs of one ALBEF step, by vlp.models.flops' convention."""
from typing import Any

from vlp.models.flops import (field, block_forward_flops, cross_attention_forward_flops, matmul_flops,
                              moe_mlp_forward_flops, vit_forward_flops, vit_seq_len)
from vlp.models.layers import moe_blocks


def train_flops(model_cfg: Any, batch_size: int, queue_size: int) -> float:
  """One ALBEF step (vlp.recipes.albef): 3 x the online forward + 1 x the
  momentum forward (no backward).

  Online: ViT + projection; text-only layers + projection; ITC logits against
  [batch ; queue] in both directions; the fusion layers on 3B ITM pairs and the
  ITM head; the whole text stack on the masked text with fusion and the MLM
  head (dense + tied decoder over the vocabulary at every position).
  Momentum: ViT + projection, text-only layers + projection, its own ITC
  logits, and the whole stack + MLM head on the masked text.
  """
  im, tx, e = field(model_cfg, "image"), field(model_cfg, "text"), field(model_cfg, "embed_dim")
  fusion, depth = field(model_cfg, "fusion_layer"), field(tx, "depth")
  seq, w, mlp = field(tx, "context_length"), field(tx, "width"), field(tx, "mlp_dim")
  n_img = vit_seq_len(im)
  moe = field(tx, "moe")
  experts = moe_blocks(depth, moe)  # MoE blocks anywhere in the stack, text-only or fusion

  def layer(i):
    dense = block_forward_flops(seq, w, mlp)
    if not experts[i]:
      return dense
    return dense + moe_mlp_forward_flops(seq, w, mlp, moe) - 2 * matmul_flops(seq, mlp, w)

  text_only = sum(layer(i) for i in range(fusion)) + matmul_flops(1, e, w)
  cross = cross_attention_forward_flops(seq, n_img, w, field(im, "width"))
  fusion_layers = sum(layer(i) + cross for i in range(fusion, depth))
  mlm_head = matmul_flops(seq, w, w) + matmul_flops(seq, field(tx, "vocab_size"), w)
  itc = 2 * matmul_flops(batch_size, batch_size + queue_size, e)
  vit = vit_forward_flops(im, e, tokens_out=True)
  per_example = vit + text_only + 3 * (fusion_layers + matmul_flops(1, 2, w)) + text_only + fusion_layers + mlm_head
  online = batch_size * per_example + itc
  momentum = batch_size * (vit + 2 * text_only + fusion_layers + mlm_head) + itc
  return 3.0 * online + momentum
