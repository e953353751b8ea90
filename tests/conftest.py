"""Every test sees 8 simulated CPU devices, as a small pod slice would look."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

from tiny import get_config as tiny_base  # noqa: E402


def tiny_config(**overrides):
  """A model small enough to train a few steps in seconds (tests/tiny.py), with dotted overrides."""
  c = tiny_base()
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
