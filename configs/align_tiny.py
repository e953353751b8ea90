"""ALIGN-style dual encoder, tiny, on the built-in synthetic dataset.

About five minutes on a 2-core CPU:
  vlp train --config=configs/align_tiny.py --workdir=workdirs/align_tiny
Overrides use dotted keys, e.g. `--config.total_steps=100 --config.model.head=sigmoid`.
"""
from vlp.core.config import eval_config
from vlp.recipes import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.total_steps = 400
  c.batch_size = 128
  c.model.image.update(image_size=32, patch_size=4, width=128, depth=3, num_heads=4, mlp_dim=512)
  c.model.text.update(vocab_size=1024, context_length=32, width=128, depth=3, num_heads=4, mlp_dim=512)
  c.model.embed_dim = 128
  c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.05)
  c.eval_every = 200
  # besides the held-out retrieval: zero-shot colour+shape classification of 500 unseen scenes
  c.evals.zeroshot = eval_config('zeroshot', data='synthetic', num_images=500)
  c.checkpoint.every = 200
  return c
