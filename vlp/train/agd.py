"""Alternating gradient descent: one task per step, chosen from (seed, step).

A task (config.tasks.NAME, vlp.core.config.TASK_DEFAULTS) has its own data, loss,
batch size and resolutions. Each (task, resolution) is a *variant* of the
plan (vlp.plan) with its own compiled step, batch size and input iterator; a
task with several resolutions runs them in turn. A config without tasks has
one (the recipe's default), run every step.

The schedule is a pure function of the step, so a resumed run continues the
same task sequence without saving anything:
  'interval'  rounds over the tasks in name order, task t joining every
              interval_t-th round (IMP's code: image-text every round,
              video-text every 12th); periodic, so step -> task is a lookup.
  'weighted'  task t with probability weight_t / sum(weights), drawn by a
              generator seeded with (seed, step) (IMP's paper).

Every task updates only the parameters its loss touches (the recipe says which:
`untouched_params`); the others keep their value *and* optimizer state, so a
task that does not run causes no Adam momentum or weight-decay drift.
"""
import math

import jax
import numpy as np


class Schedule:
  """step -> index into plan.variants; deterministic in (config.seed, step)."""

  def __init__(self, plan):
    self.kind, self.seed = plan.config.agd.schedule, plan.config.seed
    tasks = sorted(plan.tasks)
    self.variants_of = [[v.index for v in plan.variants if v.task == t] for t in tasks]
    cfgs = [plan.tasks[t] for t in tasks]
    self.weights = np.asarray([c.weight for c in cfgs], np.float64)
    self.weights /= self.weights.sum()
    rounds = math.lcm(*[c.interval for c in cfgs])
    # one period of the interval schedule: task indices, round after round
    self.period = [i for r in range(rounds) for i, c in enumerate(cfgs) if r % c.interval == 0]
    counts = np.zeros((len(self.period) + 1, len(tasks)), np.int64)
    for p, i in enumerate(self.period):
      counts[p + 1] = counts[p]
      counts[p + 1, i] += 1
    self.counts = counts  # counts[p, t]: runs of task t in the first p steps of a period

  def task(self, step: int) -> tuple[int, int]:
    """(task index, how many times it ran before this step) under 'interval'."""
    cycle, p = divmod(step, len(self.period))
    t = self.period[p]
    return t, cycle * int(self.counts[-1, t]) + int(self.counts[p, t])

  def __call__(self, step: int) -> int:
    if self.kind == 'weighted':
      rng = np.random.default_rng([self.seed, step, 0xA6D])
      t = int(rng.choice(len(self.weights), p=self.weights))
      options = self.variants_of[t]
      return options[int(rng.integers(len(options)))]
    t, runs = self.task(step)
    options = self.variants_of[t]
    return options[runs % len(options)]  # a task's resolutions in turn


def select_touched(new, old, untouched: frozenset[str]):
  """`new`, but `old` for the parameters under the top-level keys `untouched` and for
  every tree that mirrors them (Adam's mu and nu): a leaf belongs to the parameter whose
  top-level key is the first dict key on its path (the params are a dict of modules;
  optax states reach them through tuples and named fields). Leaves without a dict key
  (Adam's step count) come from `new`."""
  if not untouched:
    return new

  def pick(path, a, b):
    first = next((k.key for k in path if isinstance(k, jax.tree_util.DictKey)), None)
    return b if first in untouched else a

  return jax.tree_util.tree_map_with_path(pick, new, old)
