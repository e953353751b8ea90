"""The run's plan, built once from (config, device count, process count).

It validates the config (the common keys, the recipe's, the mesh) and lays
out the *variants*: one compiled step per (task, resolution), each with its
global batch size rounded for the mesh, its input item and seed, and its
batch spec (the recipe's one schema: what the input pipeline yields, what
the compiled step is lowered for, what benchmarks fill with random numbers).
A config without `config.tasks` has the recipe's default task (config.data
at config.batch_size); its metrics carry no prefix and its input iterator is
the checkpoint item `data`. Every consumer (trainer, evaluators, export,
benchmarks) receives the plan instead of recomputing it.

A task with several resolutions runs them in turn, its batch scaled so that
the vision tokens per step stay the same (rounded down to what the devices
split).
"""
import dataclasses
import math

import jax

from vlp import config as config_lib, losses, parallel, recipes
from vlp.config import ConfigError, check

# the default task's fields are the config's top-level keys; 'micro' names the key that
# splits a batch into micro-batches
_DEFAULT_KEYS = {'batch_size': 'batch_size', 'accum_steps': 'accum_steps', 'micro': 'accum_steps',
                 'label_smoothing': 'loss.label_smoothing'}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One compiled step: a task at one resolution."""
  name: str  # the task's name, '<task>_<size>px' for several sizes
  task: str
  index: int  # position in the plan; seeds the variant's DropToken keys
  batch_size: int  # global
  image_size: int
  frames: int = 0  # video variants
  accum_steps: int = 1
  data_item: str = 'data'  # the checkpoint item of its input iterator
  seed: int = 0  # of its input order: tasks reading the same data see different examples
  metric_prefix: str = ''  # '<name>/' when there are several tasks
  cfg: object = None  # the task entry (ml_collections.ConfigDict)
  spec: dict = dataclasses.field(default=None, compare=False)  # key -> ShapeDtypeStruct of the global batch

  @property
  def vision(self) -> str:
    return next(m for m in self.cfg.modalities if m in config_lib.VISION)


@dataclasses.dataclass(frozen=True)
class Plan:
  config: object
  recipe: recipes.Recipe
  sizes: dict  # mesh axis sizes
  process_count: int
  tasks: dict  # name -> task entry (config.tasks, or the recipe's default task)
  variants: tuple

  def batch_spec(self, variant: Variant, mesh) -> dict:
    """The variant's abstract global batch, sharded over the batch axes of `mesh`."""
    sh = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh) for k, s in variant.spec.items()}

  def variant(self, name: str) -> Variant:
    return next(v for v in self.variants if v.name == name)

  def activation_bytes(self) -> float | None:
    """The recipe's per-device activation estimate of the largest variant (None: no estimate)."""
    est = [self.recipe.activation_bytes(self.config, v, self.sizes) for v in self.variants]
    return None if None in est else max(est)


def make(config, num_devices: int, process_count: int = 1) -> Plan:
  """Validates the config and builds the plan; raises ConfigError naming the key."""
  recipe = recipes.get(config.model.name)
  _check_sections(config, recipe)
  config_lib.validate_common(config)
  loss = config.loss
  check(loss.impl in losses.IMPLS, 'loss.impl', f'{loss.impl!r} not in {"/".join(losses.IMPLS)}')
  check(loss.impl != 'ring' or not loss.chunk_size, 'loss.chunk_size',
        'must be 0 with loss.impl=ring (its blocks are [rows, rows] already)')
  for name, _ in config.mesh_rules:
    check(name in parallel.RULES, f'mesh_rules.{name}', f'unknown logical axis; known: {", ".join(parallel.RULES)}')
  recipe.validate(config)
  _check_evals(config, recipe)
  sizes = config_lib.mesh_shape(config, num_devices)
  _check_batch_hosts(sizes, num_devices, process_count)
  tasks = dict(config.tasks) if config.tasks else recipe.default_tasks(config)
  variants = []
  for name in sorted(tasks):
    key = (lambda f: _DEFAULT_KEYS.get(f, f)) if not config.tasks else \
        (lambda f, n=name: f'tasks.{n}.{"batch_size" if f == "micro" else f}')
    variants += _task_variants(config, recipe, name, tasks[name], key, sizes, process_count, len(variants))
  return Plan(config, recipe, sizes, process_count, tasks, tuple(variants))


def validate(config, num_devices: int, process_count: int = 1) -> dict:
  """Checks the config before anything is built; returns the mesh axis sizes."""
  return make(config, num_devices, process_count).sizes


def _check_batch_hosts(sizes, num_devices: int, process_count: int):
  """Every process feeds its own batch rows, and the batch is split over data x fsdp: the
  tensor x expert devices that share rows must lie within one process (parallel.make_mesh
  checks the real device layout)."""
  local, group = num_devices // process_count, sizes['tensor'] * sizes['expert']
  if process_count > 1 and local % group:
    key = 'mesh.tensor' if sizes['tensor'] > 1 else 'mesh.expert'
    raise ConfigError(f"config key '{key}': the tensor x expert = {group} devices of a block of batch rows do not "
                      f'fit in the {local} devices of a process ({process_count} processes): processes would feed '
                      f'the same rows; make tensor x expert divide {local}')


def _check_sections(config, recipe):
  """The config was built for this recipe (vlp.recipes.base_config): its keys are there."""
  for section, keys in recipe.config_sections().items():
    if section == 'evals':
      continue
    have = config.get(section)
    missing = [k for k in keys if have is None or k not in have] if isinstance(keys, dict) else []
    if have is None or missing:
      raise ConfigError(f"config key '{section}{'.' + missing[0] if have is not None else ''}': missing for "
                        f"model.name={recipe.name!r}; build the config with "
                        f"vlp.recipes.base_config({recipe.name!r})")


def _check_evals(config, recipe):
  for name, e in config.evals.items():
    check(e.kind in recipe.eval_kinds, f'evals.{name}.kind',
          f'{e.kind!r} is not an evaluator of {recipe.name!r}; it has {"/".join(recipe.eval_kinds)}')
    check(e.data != 'synthetic_video' or 'video' in recipe.modalities, f'evals.{name}.data',
          f"'synthetic_video' evaluates a video encoder; {recipe.name!r} has none")


def _task_variants(config, recipe, name, t, key, sizes, process_count, first: int) -> list[Variant]:
  recipe.check_task(config, key, t)
  patch = config.model.image.patch_size
  resolutions = tuple(t.resolutions) or (config.model.image.image_size,)
  for size in resolutions:
    check(size % patch == 0, key('resolutions'), f'{size!r} is not a positive multiple of the patch size {patch}')
  shards = sizes['data'] * sizes['fsdp']
  unit = math.lcm(shards * t.accum_steps, process_count)  # every device: the same rows of each micro-batch
  base_tokens = recipe.vision_tokens(config, t, resolutions[0]) * t.batch_size
  default = not config.tasks
  out = []
  for size in resolutions:
    batch = t.batch_size
    if size != resolutions[0]:  # same vision tokens per step, rounded down to what the devices split
      batch = max(base_tokens // recipe.vision_tokens(config, t, size) // unit * unit, 0)
    devices = math.lcm(shards, process_count)
    if batch < devices or batch % devices:
      raise ConfigError(f"config key '{key('batch_size')}': {batch} examples at {size} px do not split into "
                        f'{devices} equal parts: not divisible by the batch devices data*fsdp = {shards} and by '
                        f'{process_count} processes')
    if batch % unit:
      raise ConfigError(f"config key '{key('micro')}': {batch} examples at {size} px do not split into {unit} "
                        f'equal parts ({t.accum_steps} micro-batches over data*fsdp = {shards} devices)')
    index = first + len(out)
    vname = name if len(resolutions) == 1 else f'{name}_{size}px'
    v = Variant(vname, name, index, batch, size, recipe.frames(config, t), t.accum_steps,
                data_item='data' if default else f'data_{vname}',
                seed=config.seed if default else config.seed + 1009 * (index + 1),
                metric_prefix='' if default else f'{vname}/', cfg=t)
    micro = batch // t.accum_steps
    chunk, rows = config.loss.chunk_size, micro // shards  # the loss walks each device's rows in chunks
    check(t.loss != 'contrastive' or not chunk or rows % min(chunk, rows) == 0, 'loss.chunk_size',
          f'{chunk} does not divide the {rows} rows per device of the micro-batch {micro} of {vname}')
    spec = {k: jax.ShapeDtypeStruct((batch, *shape), dtype) for k, (shape, dtype) in recipe.batch_spec(config, v).items()}
    out.append(dataclasses.replace(v, spec=spec))
  return out
