"""SIGTERM -> finish the current step, save, exit 0 (the relaunch resumes there).

The signal handler only raises a flag; the loop asks `requested()` after each
step. With several processes the flag is OR-ed over all of them, so every
process stops after the same step even when the signal reaches them at
different times (a TPU maintenance event or `scancel` signals each host). That
OR is a tiny collective dispatched at one step and read at the next, so it
never makes the host wait for the device: a multi-host run stops one step
after the signal.
"""
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class Preemption:

  def __init__(self, signals=(signal.SIGTERM,)):
    self.flag = False
    self.previous = {s: signal.signal(s, self._handle) for s in signals}
    self.pending = None  # the OR over processes dispatched at the previous step

  def _handle(self, signum, frame):
    del frame
    self.flag = True
    print(f'received signal {signum}: saving after this step, then exiting', flush=True)

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    if self.pending is None:
      mesh = jax.sharding.Mesh(np.array(jax.devices()), ('all',))
      self._sharding = NamedSharding(mesh, P('all'))
      self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
    local = np.full((jax.local_device_count(),), self.flag, np.int32)
    previous = self.pending
    self.pending = self._any(jax.make_array_from_process_local_data(self._sharding, local))
    return previous is not None and bool(np.asarray(previous))

  def close(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)
