"""`config.profile.steps = (A, B)`: a `jax.profiler` trace of training steps A+1..B.

The trace starts when A steps are done (the state computed, the next step not dispatched yet)
and stops when B are, again once the state is computed: it holds those steps' device work, not
only their dispatch, and nothing of the steps around them.
Every process traces: into WORKDIR/profile with one process, WORKDIR/profile/process_<i> with
several (jax.profiler traces the calling process only; its files are named by host, and
processes sharing a host would overwrite each other's). TensorBoard's profile plugin or xprof
reads the directory: `tensorboard --logdir WORKDIR/profile`. A run resumed inside the range
traces from its first step to B; a run that ends (or is preempted) before B stops the trace
at its end.
"""
import jax

from vlp.workdir import layout


class StepTrace:
  """Starts and stops the profiler around steps (A, B] of config.profile.steps; off for ()."""

  def __init__(self, steps, workdir: str, log=print):
    self.range = tuple(steps) or None
    self.dir, self.log, self.active = layout.profile_dir(workdir), log, False

  def before(self, done: int, state=None):
    """Called with the steps done so far and the state, before the next step is dispatched."""
    if self.range and not self.active and self.range[0] <= done < self.range[1]:
      if state is not None:
        jax.block_until_ready(state)  # the steps before are not in the trace
      jax.profiler.start_trace(self.dir)
      self.active = True
      self.log(f'profiling steps {done + 1}..{self.range[1]} into {self.dir}')

  def after(self, done: int, state):
    """Called after a step is dispatched, with the steps done (that one included)."""
    if self.active and done >= self.range[1]:
      self.stop(state)

  def stop(self, state=None):
    """Stops a running trace (once `state` is computed)."""
    if not self.active:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    self.log(f'profile written to {self.dir} (tensorboard --logdir {self.dir})')
