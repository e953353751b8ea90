"""SIGTERM -> finish the current step, save, exit 0 (the relaunch resumes there).

The signal handler only raises a flag; the loop asks `requested()` after each
step. With several processes the flag is OR-ed over all of them, so every
process stops after the same step even when the signal reaches them at
different times (a TPU maintenance event or `scancel` signals each host).
"""
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:

  def __init__(self, signals=(signal.SIGTERM,)):
    self.flag = False
    self.previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    self.flag = True
    print(f'received signal {signum}: saving after this step, then exiting', flush=True)

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))

  def close(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)
