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


def train_losses(config, mesh, steps=3, variant=None):
  """(losses, final state, last metrics, compiled step) of `steps` steps on one random batch
  (of an IMP task variant, if given)."""
  from vlp.bench.step import random_batch
  from vlp.train import state as state_lib, step as step_lib
  setup = state_lib.make_setup(config, mesh)
  state = state_lib.init_state(config, setup)
  train_step, _ = step_lib.compile_train_step(config, setup, variant)
  batch = random_batch(config, mesh, variant=variant)
  out = []
  for _ in range(steps):
    state, metrics = train_step(state, batch)
    out.append(float(metrics['loss']))
  return out, state, metrics, train_step


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture(scope='session')
def _gcs_server():
  import gcs_emulator
  emu = gcs_emulator.Emulator()
  try:
    emu.start()
  except gcs_emulator.Unavailable as e:
    pytest.skip(f'GCS emulator unavailable: {e}')
  yield emu
  emu.stop()


@pytest.fixture
def gcs(_gcs_server):
  """A local GCS emulator (fake-gcs-server on 127.0.0.1) with the standard variables set
  (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL) for this test; yields it (.bucket, .url, .env())."""
  import gcs_emulator
  restore = gcs_emulator.set_env(_gcs_server.env())
  yield _gcs_server
  restore()


@pytest.fixture(autouse=True)
def _no_compile_cache_leak():
  """A run in this process may point XLA's persistent cache at its workdir (config.compile_cache);
  the next test must not keep writing there."""
  yield
  import sys
  if 'jax' in sys.modules:
    import jax
    if jax.config.jax_compilation_cache_dir:
      jax.config.update('jax_compilation_cache_dir', None)
      from jax._src import compilation_cache
      compilation_cache.reset_cache()
