"""A tiny IMP config (three tasks, one at two resolutions), as a file so tests can also
launch it as `vlp train --config=tests/tiny_imp.py`."""
import os

from vlp.core.config import task_config
from vlp.recipes import base_config


def get_config(arg=None):
  c = base_config('imp')
  c.compile_cache = os.environ.get('VLP_TEST_COMPILE_CACHE', 'workdir')  # the session's (tests/conftest.py)
  c.total_steps = 6
  c.model.image.update(image_size=16, patch_size=4)
  c.model.text.update(vocab_size=1024, context_length=16)
  c.model.encoder.update(width=32, depth=2, num_heads=2, mlp_dim=64)
  c.model.video.update(frames=4, tubelet_size=2)
  c.model.embed_dim = 32
  c.tasks.image_text = task_config(data='synthetic', modalities=('image', 'text'), batch_size=32,
                                   resolutions=(16, 32))
  c.tasks.video_text = task_config(data='synthetic_video', modalities=('video', 'text'), batch_size=16,
                                   drop_token=0.5)
  c.tasks.image_class = task_config(data='synthetic', modalities=('image',), loss='classification',
                                    batch_size=16, interval=2)
  c.agd.schedule = arg or 'interval'
  c.data.update(train_examples=2000, eval_images=32, num_workers=0, prefetch=2)
  c.optim.update(warmup_steps=2, lr=3e-3)
  c.log_every = 1
  c.eval_every = 0
  c.evals = {}
  c.checkpoint.update(every=3, keep=3)
  return c
