"""Alternating gradient descent (IMP): one task per step, chosen from (seed, step).

A task (config.tasks.NAME, vlp.config.TASK_DEFAULTS) has its own data, loss,
batch size and resolutions. Each (task, resolution) is a *variant* with its
own compiled step, batch size and input iterator; a task with several
resolutions runs them in turn, its batch scaled so that the vision tokens per
step stay the same.

The schedule is a pure function of the step, so a resumed run continues the
same task sequence without saving anything:
  'interval'  rounds over the tasks in name order, task t joining every
              interval_t-th round (IMP's code: image-text every round,
              video-text every 12th); periodic, so step -> task is a lookup.
  'weighted'  task t with probability weight_t / sum(weights), drawn by a
              generator seeded with (seed, step) (IMP's paper).

Every task updates only the parameters its loss touches (the model says which:
`touched_params`); the others keep their value *and* optimizer state, so a
task that does not run causes no Adam momentum or weight-decay drift.
"""
import dataclasses
import math

import jax
import numpy as np

from vlp.config import VISION, ConfigError


@dataclasses.dataclass(frozen=True)
class Variant:
  """One compiled step: a task at one resolution."""
  name: str  # metric prefix and checkpoint item; the task's name, '<task>_<size>px' for several sizes
  task: str  # '' for a model without tasks (ALIGN, ALBEF: config.batch_size, config.data)
  index: int  # position in variants(config); seeds the variant's input order
  batch_size: int  # global
  image_size: int
  frames: int = 0  # video variants
  accum_steps: int = 1
  data_item: str = 'data'  # the checkpoint item of its input iterator
  cfg: object = None  # the task entry (ml_collections.ConfigDict) or None

  @property
  def vision(self) -> str | None:
    return next((m for m in self.cfg.modalities if m in VISION), None) if self.cfg else 'image'


def task_names(config) -> list[str]:
  return sorted(config.tasks.keys())


def vision_tokens(config, task, image_size: int) -> int:
  """Vision tokens of one example of `task` at `image_size` (before DropToken)."""
  grid = (image_size // config.model.image.patch_size) ** 2
  vision = next(m for m in task.modalities if m in VISION)
  if vision == 'video':
    return grid * (task.frames or config.model.video.frames) // config.model.video.tubelet_size
  return grid


def batch_unit(sizes: dict, process_count: int, accum_steps: int) -> int:
  """What every batch must be a multiple of: the batch devices (data x fsdp) times the
  micro-batches, and the process count."""
  return math.lcm(sizes['data'] * sizes['fsdp'] * accum_steps, process_count)


def variants(config, sizes: dict | None = None, process_count: int = 1) -> list[Variant]:
  """The config's variants: one per (task, resolution), or the single variant of a model
  without tasks. `sizes` (the mesh) rounds scaled batches to what the devices can split."""
  if not config.tasks:
    return [Variant('', '', 0, config.batch_size, config.model.image.image_size, accum_steps=config.accum_steps)]
  out = []
  for task in task_names(config):
    t = config.tasks[task]
    resolutions = tuple(t.resolutions) or (config.model.image.image_size,)
    unit = batch_unit(sizes, process_count, t.accum_steps) if sizes else t.accum_steps
    base = vision_tokens(config, t, resolutions[0]) * t.batch_size
    for size in resolutions:
      batch = t.batch_size
      if size != resolutions[0]:  # same vision tokens per step, rounded down to what the devices split
        batch = max(base // vision_tokens(config, t, size) // unit * unit, 0)
      if batch < unit or batch % unit:
        raise ConfigError(f"config key 'tasks.{task}.batch_size': {batch} examples at {size} px do not "
                          f'split into {unit} equal parts (batch devices x accum_steps, and processes)')
      name = task if len(resolutions) == 1 else f'{task}_{size}px'
      frames = (t.frames or config.model.video.frames) if 'video' in t.modalities else 0
      out.append(Variant(name, task, len(out), batch, size, frames, t.accum_steps, f'data_{name}', t))
  return out


class Schedule:
  """step -> index into variants(config); deterministic in (config.seed, step)."""

  def __init__(self, config, variants_: list[Variant]):
    self.kind, self.seed = config.agd.schedule, config.seed
    tasks = sorted({v.task for v in variants_})
    self.variants_of = [[v.index for v in variants_ if v.task == t] for t in tasks]
    if not config.tasks:  # one variant, every step
      self.kind = 'single'
      return
    cfgs = [config.tasks[t] for t in tasks]
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
    if self.kind == 'single':
      return 0
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
