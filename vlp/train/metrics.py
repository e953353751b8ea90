"""Metrics to JSONL and TensorBoard event files (process 0 only), and a compilation counter."""
import contextlib
import json
import os

import jax

_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # jax._src.dispatch
_counters = []  # the CompileCounters counting now


def _on_event(event, duration, **kwargs):
  del duration, kwargs
  if event == _BACKEND_COMPILE_EVENT:
    for c in _counters:
      c.count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileCounter:
  """Counts XLA compilations inside `with counter.counting():` blocks."""

  def __init__(self):
    self.count = 0

  @contextlib.contextmanager
  def counting(self):
    _counters.append(self)
    try:
      yield
    finally:
      _counters.remove(self)


class MetricWriter:

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes
    path = os.path.join(workdir, 'metrics.jsonl')
    _truncate_after(path, resume_step)
    self.jsonl = open(path, 'a')
    self.tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def read_jsonl(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_after(path: str, step: int):
  """On a resume, drops the lines a preempted run wrote after its last checkpoint,
  so the log holds one trajectory."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(kept)
