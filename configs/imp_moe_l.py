"""IMP-MoE-L (Akbari et al. 2023): imp_moe_b at the L size, a 24-block encoder of width 1024
(16 heads, MLP 4096) with 16-expert MoE MLPs in its last 12 blocks; same tasks and batches.

Target topology: v5p-256 (128 v5p chips, 4x4x8), checked before any chip is booked:
  vlp compile --config=configs/imp_moe_l.py --topology=v5p-256 --json=imp_moe_l.json
Everything else (tasks, bf16 compute, fp32 state, remat, FSDP) is imp_moe_b's, and so is
what differs from the paper (see configs/imp_moe_b.py).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location('imp_moe_b', os.path.join(os.path.dirname(__file__), 'imp_moe_b.py'))
imp_moe_b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imp_moe_b)


def get_config(arg=None):
  c = imp_moe_b.get_config(arg)
  c.model.encoder.update(width=1024, depth=24, num_heads=16, mlp_dim=4096)
  c.model.encoder.moe.update(last=12)
  c.model.embed_dim = 1024
  return c
