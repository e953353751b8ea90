"""Analytic training FLOPs of a dual encoder (ALIGN, CLIP, SigLIP), by vlp.models.flops'
convention: both towers with their projections, and the B x B logits of the contrastive loss
(counted once: t2i logits are the transpose of i2t)."""
from typing import Any

from vlp.models.flops import field, contrastive_logits_flops, text_forward_flops, vit_forward_flops


def forward_flops(model_cfg: Any, batch_size: int) -> float:
  e = field(model_cfg, "embed_dim")
  image_proj = field(model_cfg, "image_proj", True)
  per_example = (vit_forward_flops(field(model_cfg, "image"), e if image_proj else 0)
                 + text_forward_flops(field(model_cfg, "text"), e))
  return batch_size * per_example + contrastive_logits_flops(batch_size, e)


def train_flops(model_cfg: Any, batch_size: int) -> float:
  """Training FLOPs of one step of the dual encoder: 3 x forward."""
  return 3.0 * forward_flops(model_cfg, batch_size)
