"""The run's plan, built once from (config, device count, process count).

It validates the config (vlp.validation: every key, the recipe's, the mesh) and lays
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
import numpy as np
from flax import nnx

from vlp import recipes, validation
from vlp.core import config as config_lib, parallel
from vlp.core.config import ConfigError, check
from vlp.data import sources


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

  def params(self, mesh) -> 'Params':
    """The model's graph and its abstract params (param_dtype), sharded over `mesh` by the
    logical-axis rules: nothing allocated (MaxText's eval_shape)."""
    config = self.config
    graphdef, abstract_vars = nnx.split(nnx.eval_shape(lambda: self.recipe.build(config.model, config.seed)),
                                        nnx.Param)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_vars))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.model.param_dtype),
                          nnx.to_pure_dict(abstract_vars))
    rules = parallel.rules_from(config)
    shardings = parallel.tree_shardings(logical, shapes, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    validation.param_patterns(config, shapes)  # the keys that name params, now that their names are known
    return Params(graphdef, abstract, shardings, rules)

  def random_batch(self, variant: Variant, rng: np.random.Generator) -> dict:
    """Random numpy inputs of the variant's global batch (benchmarks, tests), made as the input
    pipeline makes them: pixels, token ids and labels of its source's classes, then the recipe's
    example transform on every example."""
    classes = len(sources.for_task(self.config, variant.cfg.data).class_names)
    batch = {}
    for k, s in variant.spec.items():
      if k == 'label':
        batch[k] = rng.integers(0, classes, s.shape)
      elif k in config_lib.VISION:
        batch[k] = rng.integers(0, 256, s.shape)
      elif k == 'text':
        batch[k] = rng.integers(5, self.config.model.text.vocab_size, size=s.shape)
      else:  # the example transform's
        continue
      batch[k] = batch[k].astype(s.dtype)
    transform = self.recipe.example_transform(self.config, variant, None)
    if transform is not None:
      rows = [transform({k: v[i] for k, v in batch.items()}, rng) for i in range(variant.batch_size)]
      batch = {k: np.stack([r[k] for r in rows]).astype(s.dtype) for k, s in variant.spec.items()}
    return batch

  def activation_bytes(self) -> float | None:
    """The recipe's per-device activation estimate of the largest variant (None: no estimate)."""
    est = [self.recipe.activation_bytes(self.config, v, self.sizes) for v in self.variants]
    return None if None in est else max(est)


@dataclasses.dataclass(frozen=True)
class Params:
  graphdef: nnx.GraphDef
  abstract: dict  # ShapeDtypeStructs with shardings
  shardings: dict
  rules: dict  # logical axis -> mesh axes (vlp.core.parallel.rules_from)


def make(config, num_devices: int, process_count: int = 1) -> Plan:
  """Validates the config and builds the plan; raises ConfigError naming the key."""
  recipe = recipes.get(config.model.name)
  sizes, tasks = validation.validate(config, num_devices, process_count)
  variants = []
  for task in tasks.values():
    variants += _task_variants(config, recipe, task, sizes, process_count, len(variants))
  return Plan(config, recipe, sizes, process_count, {n: t.cfg for n, t in tasks.items()}, tuple(variants))


def validate(config, num_devices: int, process_count: int = 1) -> dict:
  """Checks the config before anything is built; returns the mesh axis sizes."""
  return make(config, num_devices, process_count).sizes


def _task_variants(config, recipe, task, sizes, process_count, first: int) -> list[Variant]:
  """The variants of one task: one per resolution, the batch rounded for the mesh and the hosts."""
  t, key, name = task.cfg, task.key, task.name
  patch = config.model.image.patch_size
  resolutions = tuple(t.resolutions) or (config.model.image.image_size,)
  for size in resolutions:
    check(size % patch == 0, key('resolutions'), f'{size!r} is not a positive multiple of the patch size {patch}')
  shards = sizes['data'] * sizes['fsdp']
  unit = math.lcm(shards * t.accum_steps, process_count)  # every device: the same rows of each micro-batch
  tokens = lambda size: recipe.vision(config, t, size)[1]
  base_tokens = tokens(resolutions[0]) * t.batch_size
  out = []
  for size in resolutions:
    batch = t.batch_size
    if size != resolutions[0]:  # same vision tokens per step, rounded down to what the devices split
      batch = max(base_tokens // tokens(size) // unit * unit, 0)
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
    v = Variant(vname, name, index, batch, size, recipe.vision(config, t, size)[0], t.accum_steps,
                data_item='data' if task.default else f'data_{vname}',
                seed=config.seed if task.default else config.seed + 1009 * (index + 1),
                metric_prefix='' if task.default else f'{vname}/', cfg=t)
    micro = batch // t.accum_steps
    chunk, rows = config.loss.chunk_size, micro // shards  # the loss walks each device's rows in chunks
    check(t.loss != 'contrastive' or not chunk or rows % min(chunk, rows) == 0, 'loss.chunk_size',
          f'{chunk} does not divide the {rows} rows per device of the micro-batch {micro} of {vname}')
    spec = {k: jax.ShapeDtypeStruct((batch, *shape), dtype)
            for k, (shape, dtype) in recipe.batch_spec(config, v).items()}
    out.append(dataclasses.replace(v, spec=spec))
  return out
