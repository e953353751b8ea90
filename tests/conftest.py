"""Every test sees 8 simulated CPU devices, as a small pod slice would look."""
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One XLA cache for the session (tests/tiny.py reads it; subprocess runs inherit it): the suite
# compiles the same tiny programs in many tests. VLP_TEST_COMPILE_CACHE='' turns it off.
_OWN_CACHE = 'VLP_TEST_COMPILE_CACHE' not in os.environ
if _OWN_CACHE:
  os.environ['VLP_TEST_COMPILE_CACHE'] = tempfile.mkdtemp(prefix='vlp-tests-xla-')
_SESSION_CACHE = os.environ['VLP_TEST_COMPILE_CACHE'] or None

import pytest  # noqa: E402

from tiny import get_config as tiny_base  # noqa: E402


def tiny_config(recipe='align', **overrides):
  """A model small enough to train a few steps in seconds (tests/tiny.py; recipe 'align' or
  'albef'), with dotted overrides."""
  c = tiny_base(recipe)
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def build_model(model_cfg, seed=0):
  """The recipe's model for a model config."""
  from vlp import recipes
  return recipes.get(model_cfg.name).build(model_cfg, seed)


def plan_of(config, mesh=None):
  """The plan of a config, for the mesh's device count (default 8)."""
  from vlp import plan
  return plan.make(config, mesh.devices.size if mesh is not None else 8)


def variants_of(config, mesh=None) -> dict:
  """{name: variant} of the config's plan."""
  return {v.name: v for v in plan_of(config, mesh).variants}


def setup_of(config, mesh):
  from vlp.train import state as state_lib
  return state_lib.make_setup(plan_of(config, mesh), mesh)


def init_of(config, setup):
  from vlp.train import state as state_lib
  return state_lib.init_state(plan_of(config, setup.mesh), setup)


def compile_of(config, setup, variant=None):
  """The compiled step of a variant (default: the plan's first) and its compile seconds."""
  from vlp.train import step as step_lib
  plan = plan_of(config, setup.mesh)
  return step_lib.compile_train_step(plan, setup, variant or plan.variants[0])


def random_batch_of(config, mesh, seed=0, variant=None):
  """A random global batch of a variant (default: the plan's first), sharded over the mesh."""
  from vlp.bench.step import random_batch
  plan = plan_of(config, mesh)
  return random_batch(plan, mesh, variant or plan.variants[0], seed=seed)


def train_losses(config, mesh, steps=3, variant=None):
  """(losses, final state, last metrics, compiled step) of `steps` steps on one random batch
  (of a task variant, if given)."""
  setup = setup_of(config, mesh)
  state = init_of(config, setup)
  train_step, _ = compile_of(config, setup, variant)
  batch = random_batch_of(config, mesh, variant=variant)
  out = []
  for _ in range(steps):
    state, metrics = train_step(state, batch)
    out.append(float(metrics['loss']))
  return out, state, metrics, train_step


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def tiny():
  return tiny_config


@pytest.fixture(scope='session')
def _gcs_server():
  import gcs_emulator
  emu = gcs_emulator.start_or_skip()
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


def _use_session_cache():
  """Points XLA's persistent cache at the session's (programs that took 1 s or more to compile)."""
  import jax
  from jax._src import compilation_cache
  jax.config.update('jax_compilation_cache_dir', _SESSION_CACHE)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def _no_compile_cache_leak():
  """A run in this process may point XLA's persistent cache at its workdir (config.compile_cache);
  the next test must not keep writing there: it goes back to the session's cache (or none)."""
  import jax

  def moved():
    return (jax.config.jax_compilation_cache_dir != _SESSION_CACHE
            or jax.config.jax_persistent_cache_min_compile_time_secs != 1.0)
  if moved():
    _use_session_cache()
  yield
  if moved():
    _use_session_cache()


def transformers_python() -> str:
  """The open_clip environment's python (launch/setup_bench_env.sh), where it has transformers;
  skips the test otherwise."""
  import subprocess
  from vlp.bench import compare
  try:
    python = compare.bench_python(None)
  except compare.ReferenceEnvError as e:
    pytest.skip(str(e))
  if subprocess.run([python, '-c', 'import transformers'], capture_output=True).returncode:
    pytest.skip('the open_clip environment has no transformers (launch/setup_bench_env.sh installs it)')
  return python
