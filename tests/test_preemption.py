"""Preemption: SIGTERM saves and exits 0, the relaunch continues bit for bit;
SIGKILL in the middle of an async save leaves the previous checkpoint whole."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import init_of, setup_of, tiny_config

from vlp import validation
from vlp.core import parallel
from vlp.train import loop
from vlp.workdir import checkpoints, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT}  # the same XLA flags (8 devices) as this process


def _losses(workdir):
  return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(str(workdir)) if 'loss' in r}


def _wait_for_step(workdir, step, proc, timeout=600):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(s >= step for s in _losses(workdir)):
      return
    time.sleep(0.02)
  raise AssertionError(f'training did not reach step {step}: {proc.communicate()[0][-2000:]}')


@pytest.mark.slow
def test_sigterm_saves_and_the_relaunch_continues_bit_for_bit(tmp_path):
  n = 60
  overrides = {'total_steps': n, 'checkpoint.every': 1000}  # no periodic save: only the preemption's
  loop.train(tiny_config(**overrides), str(tmp_path / 'straight'), progress=False)
  workdir = str(tmp_path / 'preempted')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'vlp.cli', 'train', f'--config={ROOT}/tests/tiny.py', f'--workdir={workdir}',
       '--no_progress', *(f'--config.{k}={v}' for k, v in overrides.items())],
      env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for_step(workdir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-2000:]
  stopped = checkpoints.manager(workdir, tiny_config().checkpoint, read_only=True).latest_step()
  assert 2 <= stopped < n and f'preempted: saved step {stopped}' in out
  before = _losses(workdir)
  assert sorted(before) == list(range(1, stopped + 1))  # logged up to the saved step
  loop.train(tiny_config(**overrides), workdir, progress=False)  # the relaunch
  after, straight = _losses(workdir), _losses(tmp_path / 'straight')
  concatenated = [before[s] for s in range(1, stopped + 1)] + [after[s] for s in range(stopped + 1, n + 1)]
  assert concatenated == [straight[s] for s in range(1, n + 1)]  # bit for bit


KILL_DURING_SAVE = '''
import os, signal, sys
import jax
sys.path.insert(0, {tests!r})
from tiny import get_config
from vlp import plan as plan_lib
from vlp.core import parallel
from vlp.train import state as state_lib
from vlp.workdir import checkpoints
config = get_config()
config.model.text.vocab_size = 65536  # a 64 MiB state: the async write takes a while
mesh = parallel.make_mesh({{'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}})
plan = plan_lib.make(config, 8)
setup = state_lib.make_setup(plan, mesh)
state = state_lib.init_state(plan, setup)
ckpt = checkpoints.manager({workdir!r}, config.checkpoint)
ckpt.save(1, state, force=True)
ckpt.wait()
ckpt.save(2, jax.tree.map(lambda x: x + 1, state), force=True)  # returns while the write goes on
os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.slow
def test_sigkill_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
  workdir = str(tmp_path)
  script = KILL_DURING_SAVE.format(tests=os.path.join(ROOT, 'tests'), workdir=workdir)
  proc = subprocess.run([sys.executable, '-c', script], env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  names = os.listdir(tmp_path / 'checkpoints')
  assert '1' in names and '2' not in names  # step 2 never committed ...
  assert any(n.startswith('2.orbax-checkpoint-tmp') for n in names)  # ... its write was cut short
  config = tiny_config(**{'model.text.vocab_size': 65536})
  mesh = parallel.make_mesh(validation.mesh_shape(config, jax.device_count()))
  setup = setup_of(config, mesh)
  ckpt = checkpoints.manager(workdir, config.checkpoint)
  assert ckpt.latest_step() == 1
  restored = ckpt.restore(1, setup.abstract)
  jax.tree.map(np.testing.assert_array_equal, restored, init_of(config, setup))
  ckpt.save(2, restored, force=True)  # and training can go on saving over the torn step
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']  # the torn write's temporary dir is gone
