"""What the training loop measures besides the step's own metrics: per-host timings gathered
from every process, and a compilation counter. (The files they go to: vlp.workdir.metrics.)"""
import contextlib

import jax
import numpy as np

_BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # jax._src.dispatch
_counters = []  # the CompileCounters counting now


def _on_event(event, duration, **kwargs):
  del duration, kwargs
  if event == _BACKEND_COMPILE_EVENT:
    for c in _counters:
      c.count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def across_hosts(values: dict) -> dict:
  """Per-host scalars of every process as {name: the max over hosts, name_mean, name_host: the
  host with the max}: the slowest host bounds a synchronous step, so its input wait is the one
  to read. A collective: every process calls it at the same point. One process: its own values."""
  names = sorted(values)
  if jax.process_count() == 1:
    table = np.asarray([[values[k] for k in names]], np.float32)
  else:
    from jax.experimental import multihost_utils
    table = np.asarray(multihost_utils.process_allgather(np.asarray([values[k] for k in names], np.float32)))
  out = {}
  for i, name in enumerate(names):
    out.update({name: float(table[:, i].max()), f'{name}_mean': float(table[:, i].mean()),
                f'{name}_host': int(table[:, i].argmax())})
  return out


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
