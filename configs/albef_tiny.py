"""ALBEF, tiny, on the built-in synthetic dataset (the towers of align_tiny).

About 20 minutes on a 2-core CPU (a step costs 3.4x align_tiny's: 400 steps
take the time of align_tiny at 1368 steps, the comparison in docs/results.md):
  vlp train --config=configs/albef_tiny.py --workdir=workdirs/albef_tiny
The held-out eval reports ITC retrieval (`retrieval/...`) and the same after
re-ranking the top evals.retrieval.rerank_k candidates by ITM (`retrieval/itm/...`, as
ALBEF) and by ITM + ITC (`retrieval/itm_itc/...`, as BLIP).
"""
from vlp.recipes import base_config


def get_config(arg=None):
  del arg
  c = base_config('albef')
  c.total_steps = 400
  c.batch_size = 128
  c.model.image.update(image_size=32, patch_size=4, width=128, depth=3, num_heads=4, mlp_dim=512)
  # 3 text-only layers (align_tiny's text tower) + 2 fusion layers
  c.model.text.update(vocab_size=1024, context_length=32, width=128, depth=5, num_heads=4, mlp_dim=512)
  c.model.fusion_layer = 3
  c.model.embed_dim = 128
  # ALBEF's m = 0.995 lags ~200 steps and its queue (65536 / 512) 128 steps, out of
  # ~800k steps; a run of 400 steps needs a momentum model and queue that keep up.
  c.albef.update(momentum=0.9, queue_size=1024, alpha_warmup_steps=50)
  c.evals.retrieval.rerank_k = 16  # an itm_rerank evaluator (the ALBEF recipe's default)
  c.optim.update(lr=1e-3, warmup_steps=30, weight_decay=0.02)
  c.eval_every = 0
  c.checkpoint.every = 200
  return c
