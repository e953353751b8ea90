"""Multi-host on one machine: 2 processes x 4 CPU devices (gloo collectives,
launched by launch/multiprocess_cpu.sh as `vlp train --coordinator ...`)
against 1 process x 8 devices, preempted and relaunched, and the checkpoint of
the two restored into one process on another mesh."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from conftest import tiny_config

from vlp.train import loop
from vlp.workdir import checkpoints, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny.py')


def launch(workdir, processes, devices, overrides):
  """`vlp train` in local processes joined by jax.distributed, by launch/multiprocess_cpu.sh."""
  return subprocess.Popen(
      ['bash', os.path.join(ROOT, 'launch', 'multiprocess_cpu.sh'), f'--processes={processes}',
       f'--devices={devices}', f'--port={portpicker.pick_unused_port()}', f'--config={TINY}',
       f'--workdir={workdir}', '--no_progress', *(f'--config.{k}={v}' for k, v in overrides.items())],
      env={**os.environ, 'PYTHONPATH': ROOT, 'PYTHON': sys.executable}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=900):
  out = proc.communicate(timeout=timeout)[0]
  assert proc.returncode == 0, out[-5000:]
  return out


def losses(workdir):
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return {}
  return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(str(workdir)) if 'loss' in r}


@pytest.mark.slow
def test_two_processes_train_like_one_survive_sigterm_and_restore_onto_another_mesh(tmp_path):
  n = 20
  first = {'total_steps': n, 'checkpoint.every': 1000}  # saves at the end and on SIGTERM only
  loop.train(tiny_config(**first), str(tmp_path / 'one'), progress=False)  # 1 process x 8 devices
  two = tmp_path / 'two'
  proc = launch(two, 2, 4, first)
  deadline = time.time() + 600
  while not any(s >= 2 for s in losses(two)) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both processes
  out = finish(proc)
  assert out.count('per-device memory') == 1  # process 0 alone prints
  stopped = checkpoints.manager(str(two), tiny_config().checkpoint, read_only=True).latest_step()
  assert 2 <= stopped < n and f'preempted: saved step {stopped}' in out
  # every process saved its input position
  assert sorted(os.listdir(two / 'checkpoints' / str(stopped) / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  finish(launch(two, 2, 4, first))  # the relaunch resumes state and input positions
  one, both = losses(tmp_path / 'one'), losses(two)
  assert sorted(both) == list(range(1, n + 1))
  np.testing.assert_allclose([both[s] for s in range(1, n + 1)], [one[s] for s in range(1, n + 1)],
                             rtol=0, atol=1e-5)
  # input wait gathered from both processes: the slowest host's, the mean, which host
  rows = [r for r in metrics_lib.read_jsonl(str(two)) if 'data_wait_frac' in r]
  assert rows and all(r['data_wait_frac_host'] in (0, 1) and r['data_wait_frac'] >= r['data_wait_frac_mean'] - 1e-6
                      for r in rows)
  assert any(r['data_wait_frac'] > r['data_wait_frac_mean'] for r in rows)  # two hosts' own waits, not one's twice
  final = [r for r in metrics_lib.read_jsonl(str(two)) if 'time/data_wait_s' in r][-1]
  assert final['time/data_wait_s'] >= final['time/data_wait_mean_s'] - 1e-6 and final['time/step_s'] > 0
  # One process, mesh data=2 x fsdp=4: the state reshards; the input positions of two
  # processes cannot be taken over, so the pipeline restarts (restore_data=False), and
  # the same for the reference run, trained on data=8 in one process.
  more = {'total_steps': n + 2, 'checkpoint.restore_data': False}
  loop.train(tiny_config(**more), str(tmp_path / 'one'), progress=False)
  loop.train(tiny_config(**more, **{'mesh.data': 2, 'mesh.fsdp': 4}), str(two), progress=False)
  one, both = losses(tmp_path / 'one'), losses(two)
  assert sorted(both) == list(range(1, n + 3))
  np.testing.assert_allclose([both[s] for s in (n + 1, n + 2)], [one[s] for s in (n + 1, n + 2)],
                             rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_step_that_one_process_cannot_restore_is_resumed_by_none(tmp_path):
  """2 processes: the input position process 1 saved at step 4 is damaged (a file only that host
  reads). The relaunch reports step 4 in one line naming process 1, and both processes resume
  step 2, not one of them step 4 and the other step 2, and train on as one run."""
  import re
  workdir = tmp_path / 'two'
  finish(launch(workdir, 2, 2, {'total_steps': 4, 'checkpoint.every': 2}))
  (workdir / 'checkpoints' / '4' / 'data' / 'process_1-of-2.json').write_text('{"truncated by a fau')
  out = finish(launch(workdir, 2, 2, {'total_steps': 6, 'checkpoint.every': 2}))
  lines = [line for line in out.splitlines() if 'checkpoint step 4' in line]
  assert len(lines) == 1 and 'does not restore (on process 1: data/process_1-of-2.json: ' in lines[0], out[-3000:]
  assert lines[0].endswith('; resuming step 2'), lines
  assert re.search(r'^resumed step 2\b', out, re.M), out[-3000:]
  assert sorted(losses(workdir)) == list(range(1, 7))
  assert (workdir / 'checkpoints_corrupt' / '4').is_dir()
