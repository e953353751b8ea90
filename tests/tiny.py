"""The tiny test model as a config file, so tests can also launch it as `vlp train --config=tests/tiny.py`
(`tests/tiny.py:albef`: ALBEF with the same towers)."""
import os

from vlp.recipes import base_config


def get_config(arg=None):
  c = base_config('albef' if arg == 'albef' else 'align')
  c.total_steps = 6
  c.batch_size = 16
  c.model.image.update(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64)
  c.model.text.update(vocab_size=1024, context_length=16, width=32, depth=2, num_heads=2, mlp_dim=64)
  c.model.embed_dim = 32
  c.data.update(train_examples=2000, eval_images=32, num_workers=0, prefetch=2)
  c.optim.update(warmup_steps=2, lr=3e-3)
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint.update(every=3, keep=3)
  # tests share one persistent cache per session (conftest sets VLP_TEST_COMPILE_CACHE), so a program
  # the suite has compiled once loads; a test of the cache itself names its own
  c.compile_cache = os.environ.get('VLP_TEST_COMPILE_CACHE', '')
  if arg == 'noeval':  # `--config=tests/tiny.py:noeval`: no evaluator (multi-process tests that time launches)
    del c.evals['retrieval']
  return c
