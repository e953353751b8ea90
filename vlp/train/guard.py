"""Non-finite steps and loss spikes (config.nonfinite).

In the compiled step (vlp.train.step): a step whose loss or gradient norm is
not finite is not applied. The new params, optimizer state, EMA and model
state are selected against the old ones with `jnp.where` on one scalar, so the
decision never leaves the device; the step reports `nonfinite` (1.0 when it
was skipped). The step counter moves on either way: the batch was consumed.

On the host (`Tracker`, fed by the loop's logger with the metrics it reads
back, a few steps at a time): skipped steps are counted (`skipped_nonfinite`, over
the run) and each is printed; `max_consecutive` in a row ask the loop to roll
back to the last checkpoint (the input pipeline goes on, so the batches in
between are not seen again). A second rollback to the same checkpoint, with no
checkpoint saved in between, stops the run (`Diverged`, one line naming the
step). A finite loss more than `spike_zscore` standard deviations above the
mean of the last `spike_window` losses of its variant is a spike: the metric
`warn/loss_spike_z` and a printed warning.

Before a save the loop asks `params_finite`: a checkpoint never holds a
non-finite param.
"""
import collections
import math

import jax
import jax.numpy as jnp



class Diverged(RuntimeError):
  """The run rolled back to the same checkpoint twice: it stops (one line naming the step)."""


def keep_if(ok, new: dict, old: dict) -> dict:
  """`new` where the scalar `ok` is true, else `old`, leaf by leaf (a select: no host sync)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def params_finite(state) -> bool:
  """Whether the params (and EMA params) hold only finite numbers: one reduction, one bool."""
  return bool(_all_finite({k: state[k] for k in ('params', 'ema_params') if k in state}))


class Tracker:
  """The host's view of the guard: counts, the run of non-finite steps, spikes."""

  def __init__(self, cfg, log=print):
    self.cfg, self.log = cfg, log
    self.skipped = 0  # over this run
    self.in_a_row = 0
    self.longest = 0  # the longest run of non-finite steps since the last rollback
    self.windows = collections.defaultdict(lambda: collections.deque(maxlen=cfg.spike_window))

  def observe(self, step: int, prefix: str, m: dict) -> dict:
    """Metrics of the step that ended at `step` (host numbers); returns warning metrics to write now."""
    if m.get('nonfinite', 0.0) > 0:
      self.skipped += 1
      self.in_a_row += 1
      self.longest = max(self.longest, self.in_a_row)
      self.log(f'step {step}: loss {m["loss"]:.4g}, grad_norm {m["grad_norm"]:.4g}: not applied '
               f'(skipped_nonfinite {self.skipped}, {self.in_a_row} in a row)')
      return {}
    self.in_a_row = 0
    return self._spike(step, prefix, float(m['loss']))

  def _spike(self, step, prefix, loss) -> dict:
    window = self.windows[prefix]
    if not self.cfg.spike_window:
      return {}
    z = 0.0
    if len(window) >= max(self.cfg.spike_window // 2, 2):
      mean = sum(window) / len(window)
      std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
      z = (loss - mean) / std if std > 0 else 0.0
    if z > self.cfg.spike_zscore:
      self.log(f'step {step}: {prefix}loss spike: {loss:.4g} is {z:.1f} standard deviations above the mean '
               f'of the last {len(window)} ({mean:.4g})')
      return {f'{prefix}warn/loss_spike_z': z}  # a spike stays out of the window it is judged by
    window.append(loss)
    return {}

  def rollback_due(self) -> bool:
    """Whether max_consecutive non-finite steps came in a row since the last rollback (the loop reads
    several steps' metrics at once, so the run may have ended by the time it is seen)."""
    return self.longest >= self.cfg.max_consecutive

  def rolled_back(self):
    self.in_a_row = self.longest = 0
