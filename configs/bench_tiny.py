"""The fixed benchmark architecture of the walking-skeleton issue (do not tune).

  vlp bench step --config=configs/bench_tiny.py [--compare=open_clip]
"""
from vlp.recipes import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.batch_size = 128
  c.model.image.update(image_size=64, patch_size=8, width=256, depth=4, num_heads=4, mlp_dim=1024, pool='cls')
  c.model.text.update(vocab_size=1024, context_length=32, width=256, depth=4, num_heads=4, mlp_dim=1024)
  c.model.embed_dim = 256
  c.model.dtype = 'float32'
  c.optim.name = 'adamw'
  return c
