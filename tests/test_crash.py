"""Crash safety: `kill -9` at random moments (start-up and resume, compiling, mid-step, during
an async save, during eval) never leaves a workdir that cannot resume; the relaunches end the
run with one trajectory in the log.

`python tests/test_crash.py 20` runs 20 kills (over 100 steps) and prints what each cost.
"""
import os
import random
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'PYTHONPATH': ROOT}
sys.path.insert(0, os.path.join(ROOT, 'tests'))
import conftest  # noqa: E402,F401 - the 8 simulated devices, in this process and (ENV) the launches

from vlp.workdir import metrics as metrics_lib  # noqa: E402

EVERY = 2  # a save every 2 steps, an eval every 8: a kill lands in either often


def _launch(workdir, out, steps):
  overrides = {'total_steps': steps, 'checkpoint.every': EVERY, 'eval_every': 8, 'compile_cache': 'workdir'}
  return subprocess.Popen(
      [sys.executable, '-m', 'vlp.cli', 'train', f'--config={ROOT}/tests/tiny.py', f'--workdir={workdir}',
       '--no_progress', *(f'--config.{k}={v}' for k, v in overrides.items())],
      env=ENV, stdout=out, stderr=subprocess.STDOUT)


def _reached(workdir) -> int:
  try:
    return max((r['step'] for r in metrics_lib.read_jsonl(workdir) if 'loss' in r), default=0)
  except FileNotFoundError:
    return 0


def _kill_at_random(proc, workdir, rng, first):
  """Half the time after a random delay (start-up, resume, compiling), else once the run is a
  random few steps further (stepping, saving, evaluating) plus a jitter; the first launch always
  the latter, so that the compile cache is written once."""
  if rng.random() < 0.5 and not first:
    deadline = time.time() + rng.uniform(0.5, 10.0)
    while time.time() < deadline and proc.poll() is None:
      time.sleep(0.01)
  else:
    target = _reached(workdir) + rng.randint(1, 8)
    while _reached(workdir) < target and proc.poll() is None:
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
  if proc.poll() is None:
    proc.kill()  # SIGKILL
  return proc.wait()


def _text(path):
  with open(path) as f:
    return f.read()


def _started_from(text):
  """The step a launch went on from: 'resumed step N', 0 once it compiled without one, None if
  it was killed before it got that far."""
  resumed = re.search(r'^resumed step (\d+)', text, re.M)
  return int(resumed.group(1)) if resumed else (0 if re.search(r'^compiled ', text, re.M) else None)


def kill_loop(workdir: str, kills: int, steps: int, seed: int = 0) -> list[dict]:
  """Launches, kills at random, relaunches, `kills` times, then lets the run finish. Returns one
  entry per kill: the step the log had reached and the step the relaunch resumed from."""
  rng, history = random.Random(seed), []
  os.makedirs(workdir, exist_ok=True)
  for i in range(kills + 1):
    out_path = os.path.join(workdir, f'launch_{i}.txt')
    with open(out_path, 'w') as out:
      proc = _launch(workdir, out, steps)
      rc = _kill_at_random(proc, workdir, rng, first=i == 0) if i < kills else proc.wait(timeout=900)
    text = _text(out_path)
    assert rc in (0, -9), f'launch {i} failed by itself (rc {rc}):\n{text[-3000:]}'
    start = _started_from(text)
    if start is not None:
      for h in history:  # the kills since the last launch that got as far as choosing its step
        h.setdefault('resumed', start)
    if rc == 0:
      break
    # a launch killed before it chose its step did no work: the kill costs no steps of its own
    history.append({'kill': i, 'reached': _reached(workdir) if start is not None else None})
  assert rc == 0
  logged = [r['step'] for r in metrics_lib.read_jsonl(workdir) if 'loss' in r]
  assert logged == list(range(1, steps + 1))  # one trajectory: every step logged once
  for h in history:
    # (the log runs one step behind: a save can be committed before its step's line)
    h['recomputed'] = 0 if h['reached'] is None else max(h['reached'] - h['resumed'], 0)
  return history


@pytest.mark.slow
def test_random_kills_never_leave_a_workdir_that_cannot_resume(tmp_path):
  history = kill_loop(str(tmp_path / 'run'), kills=3, steps=20, seed=1)
  for h in history:
    assert 0 <= h['recomputed'] <= 2 * EVERY, history  # the steps since the last committed save


if __name__ == '__main__':
  import tempfile
  n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
  start = time.time()
  with tempfile.TemporaryDirectory() as d:
    hist = kill_loop(os.path.join(d, 'run'), kills=n, steps=5 * n, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0)
  lost = [h['recomputed'] for h in hist]
  print(f'{len(hist)} kills survived of {n} launched ({n - len(hist)} launches finished before their kill); '
        f'steps recomputed per kill: {lost} (mean {sum(lost) / max(len(lost), 1):.2f}); {time.time() - start:.0f} s')
