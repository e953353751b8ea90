"""Multi-host on one machine: 2 processes x 4 CPU devices (gloo collectives,
launched by launch/multiprocess_cpu.sh as `vlp train --coordinator ...`)
against 1 process x 8 devices, and the checkpoint of the two restored into one
process on another mesh."""
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest
from conftest import tiny_config

from vlp.train import loop, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny.py')


def run_processes(workdir, processes, devices, overrides, timeout=900):
  """`vlp train` in local processes joined by jax.distributed, by launch/multiprocess_cpu.sh."""
  proc = subprocess.run(
      ['bash', os.path.join(ROOT, 'launch', 'multiprocess_cpu.sh'), f'--processes={processes}',
       f'--devices={devices}', f'--port={portpicker.pick_unused_port()}', f'--config={TINY}',
       f'--workdir={workdir}', '--no_progress', *(f'--config.{k}={v}' for k, v in overrides.items())],
      env={**os.environ, 'PYTHONPATH': ROOT, 'PYTHON': sys.executable}, capture_output=True, text=True,
      timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def losses(workdir):
  return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(str(workdir)) if 'loss' in r}


@pytest.mark.slow
def test_two_processes_train_like_one_and_restore_onto_another_mesh(tmp_path):
  first = {'total_steps': 4, 'checkpoint.every': 2}
  loop.train(tiny_config(**first), str(tmp_path / 'one'), progress=False)  # 1 process x 8 devices
  out = run_processes(tmp_path / 'two', 2, 4, first)
  assert out.count('per-device memory') == 1  # process 0 alone prints
  one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=0, atol=1e-5)
  # every process saved its input position
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints' / '4' / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  # One process, mesh data=2 x fsdp=4: the state reshards; the input positions of two
  # processes cannot be taken over, so the pipeline restarts (restore_data=False), and
  # the same for the reference run, trained on data=8 in one process.
  more = {'total_steps': 6, 'checkpoint.restore_data': False}
  loop.train(tiny_config(**more), str(tmp_path / 'one'), progress=False)
  loop.train(tiny_config(**more, **{'mesh.data': 2, 'mesh.fsdp': 4}), str(tmp_path / 'two'), progress=False)
  one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert sorted(two) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([two[s] for s in (5, 6)], [one[s] for s in (5, 6)], rtol=0, atol=1e-5)
