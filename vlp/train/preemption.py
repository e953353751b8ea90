"""SIGTERM -> finish the current step, save, exit 0 (the relaunch resumes there).

The signal handler only raises a flag; the loop asks `requested()` after each
step. With several processes the flag is OR-ed over all of them, so every
process stops after the same step even when the signal reaches them at
different times (a TPU maintenance event or `scancel` signals each host). That
OR is a tiny collective dispatched at one step and read at the next, so it
never makes the host wait for the device: a multi-host run stops one step
after the signal.

Where JAX offers a preemption notice (a multi-process run whose
jax.distributed client runs the preemption sync manager, e.g. on Cloud TPU,
the notice Orbax's CheckpointManager also reads), it counts as a signal too:
`multihost_utils.reached_preemption_sync_point` is asked once per step with the
same step number on every process, and all save at the step it names.
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
    self.calls = 0  # requested() runs once per step on every process: the step id of JAX's sync point

  def _handle(self, signum, frame):
    del frame
    self.flag = True
    print(f'received signal {signum}: saving after this step, then exiting', flush=True)

  def requested(self) -> bool:
    self.calls += 1
    if jax.process_count() == 1:
      return self.flag
    if _jax_preemption_notice(self.calls):
      print('preemption notice from the cluster: saving after this step, then exiting', flush=True)
      return True
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


def _jax_preemption_notice(step_id: int) -> bool:
  """JAX's preemption sync point (the notice Orbax reads), where the distributed client runs one."""
  try:
    from jax._src import distributed
    if distributed.global_state.preemption_sync_manager is None:
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step_id))
  except Exception:  # noqa: BLE001 - an API that moved, or no sync manager: the signal path remains
    return False
