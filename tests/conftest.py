"""Every test sees 8 simulated CPU devices, as a small pod slice would look."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

from vlp.config import base_config  # noqa: E402


def tiny_config(**overrides):
  """A model small enough to train a few steps in seconds."""
  c = base_config()
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
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture
def tiny():
  return tiny_config
