"""IMP-MoE, tiny: imp_tiny with Mixture-of-Experts MLPs in the last 2 of its 4 blocks.

  vlp train --config=configs/imp_moe_tiny.py --workdir=workdirs/imp_moe_tiny
  vlp bench step --config=configs/imp_moe_tiny.py --compare=dense
As IMP: expert-choice routing with capacity factor 1.0 (on average one expert
per token: the same active FLOPs as imp_tiny, plus the router), the router in
float32. 8 experts per MoE block; everything else is imp_tiny's.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location('imp_tiny', os.path.join(os.path.dirname(__file__), 'imp_tiny.py'))
imp_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imp_tiny)


def get_config(arg=None):
  c = imp_tiny.get_config(arg)
  c.model.encoder.moe.update(num_experts=8, every=1, last=2, router='expert_choice', capacity_factor=1.0)
  return c
