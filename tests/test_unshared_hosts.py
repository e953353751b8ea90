"""Hosts that share no disk, for real: 2 processes x 4 CPU devices (jax.distributed, gloo),
each in its own mount namespace with a private tmpfs mounted at the workdir path (`unshare -m`).
A local workdir is refused in seconds with one line; a gs:// workdir (the emulator) trains,
saves both processes' input positions in the bucket, and a relaunch resumes on both."""
import json
import os
import shutil
import subprocess
import sys
import time

import portpicker
import pytest

from vlp.workdir import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny.py')


@pytest.fixture
def private_dir(tmp_path):
  """A directory that each `unshare -m` process gets its own empty tmpfs at; skips where not allowed."""
  d = tmp_path / 'private'
  d.mkdir()
  if not shutil.which('unshare'):
    pytest.skip('unshare is not installed')
  probe = subprocess.run(['unshare', '-m', '--propagation', 'private', 'sh', '-c', f'mount -t tmpfs tmpfs {d}'],
                         capture_output=True, text=True)
  if probe.returncode != 0:
    pytest.skip(f'unshare -m with a tmpfs mount is not allowed here: {probe.stderr.strip()}')
  return str(d)


def launch(private, workdir, env, config=TINY, flags=(), **overrides):
  """2 processes, each in its own mount namespace with a tmpfs at `private` (also its cwd)."""
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    train = [sys.executable, '-m', 'vlp.cli', 'train', f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={i}', f'--config={config}', f'--workdir={workdir}', '--no_progress', *flags,
             *(f'--config.{k}={v}' for k, v in overrides.items())]
    script = 'mount -t tmpfs tmpfs "$1" && cd "$1" && shift && exec "$@"'
    procs.append(subprocess.Popen(
        ['unshare', '-m', '--propagation', 'private', 'sh', '-c', script, 'sh', private, *train],
        env={**os.environ, **env, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
             'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def wait(procs, timeout):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_unshared_local_workdir_is_refused_in_seconds(private_dir, gcs):
  # the workdir is the private tmpfs itself: each process sees only its own markers
  t = time.time()
  codes, outs = wait(launch(private_dir, private_dir, gcs.env(), total_steps=2), timeout=120)
  assert codes == [2, 2], outs
  for out in outs:
    errors = [line for line in out.splitlines() if 'is not shared between the hosts' in line]
    assert len(errors) == 1 and 'use a gs:// workdir or a shared file system' in errors[0], out[-3000:]
    assert 'Traceback' not in out
  assert time.time() - t < 120


@pytest.mark.slow
def test_two_unshared_hosts_train_and_resume_on_gcs(private_dir, gcs):
  workdir = f'gs://{gcs.bucket}/twohosts'
  # the compilation cache in the bucket too; the relaunch keeps the config (as after a
  # preemption), so it loads its compiled step instead of compiling it
  common = {'config': TINY + ':noeval', 'total_steps': 4, 'checkpoint.every': 2, 'compile_cache': 'workdir'}
  codes, outs = wait(launch(private_dir, workdir, gcs.env(), **common), timeout=300)
  assert codes == [0, 0], [o[-3000:] for o in outs]
  for step in (2, 4):
    assert {f'twohosts/checkpoints/{step}/data/process_0-of-2.json',
            f'twohosts/checkpoints/{step}/data/process_1-of-2.json'} <= set(gcs.objects(f'twohosts/checkpoints/{step}/'))
  assert gcs.objects('twohosts/compile_cache/')
  first = json.loads(outs[0].splitlines()[-1])['time']
  # relaunch both from step 2: state and both processes' input positions from the bucket
  codes, outs = wait(launch(private_dir, workdir, gcs.env(), flags=['--step=2'], **common), timeout=300)
  assert codes == [0, 0], [o[-3000:] for o in outs]
  assert 'resumed step 2' in outs[0], outs[0][-3000:]
  again = json.loads(outs[0].splitlines()[-1])['time']
  print(f"compile: first launch {first['compile']:.1f} s, relaunch {again['compile']:.1f} s (from the cache)")
  assert [r['step'] for r in metrics_lib.read_jsonl(workdir) if 'loss' in r] == [1, 2, 3, 4]
  assert again['compile'] < first['compile']
