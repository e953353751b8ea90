"""One validation pass over a config, before anything is built or compiled.

Every command that takes a config (`vlp train`, `vlp eval`, `vlp export`, `vlp compile`,
`vlp bench`) builds the plan (vlp.plan.make), and the plan starts with `validate`: the
common keys (model, loss, optimiser, data through the sources table, evaluators, tasks,
checkpoints, the non-finite guard, the mesh and its rules), then the recipe's own
(`Recipe.validate`, with every task resolved), then whether the mesh fits the device and
process counts. What needs the model's param names (optim.frozen, optim.lr_mult,
init.only) is checked as soon as they are known, once (`param_patterns`, from
vlp.plan.Plan.params). A bad value is one ConfigError naming its key.
"""
import dataclasses
import difflib
import math
import re
from collections.abc import Callable

import jax
import ml_collections

from vlp import losses, recipes
from vlp.core import compiler_flags, parallel, trees
from vlp.core.config import (ATTENTION, EVAL_DEFAULTS, MESH_AXES, REMAT_POLICIES, SCHEDULES, TASK_DEFAULTS,
                             TASK_LOSSES, VISION, ConfigError, check, task_config)
from vlp.data import sources

# the default task's fields are the config's top-level keys; 'micro' names the key that
# splits a batch into micro-batches
_DEFAULT_KEYS = {'batch_size': 'batch_size', 'accum_steps': 'accum_steps', 'micro': 'accum_steps',
                 'label_smoothing': 'loss.label_smoothing'}
DEFAULT_TASK = 'default'  # the task of a config without config.tasks


@dataclasses.dataclass(frozen=True)
class Task:
  """A task entry as the plan and the recipe see it: config.tasks.NAME, or the default task."""
  name: str
  cfg: ml_collections.ConfigDict
  key: Callable[[str], str]  # a field's name -> the config key that sets it, for error messages
  default: bool = False  # the recipe's default task (config.data at config.batch_size)


def validate(config, num_devices: int, process_count: int = 1) -> tuple[dict, dict]:
  """Checks every key of the config; returns (mesh axis sizes, {name: Task})."""
  recipe = recipes.get(config.model.name)
  _sections(config, recipe)
  _model(config.model)
  _loss(config.loss)
  _optim(config.optim, config.model)
  _run(config)
  sources.validate(config.data)
  _evals(config)
  _nonfinite(config.nonfinite)
  _mesh_rules(config.mesh_rules)
  _compiler(config.compiler)
  tasks = _tasks(config, recipe)
  recipe.validate(config, list(tasks.values()))
  _evals_of(config, recipe)
  sizes = mesh_shape(config, num_devices)
  _batch_hosts(sizes, num_devices, process_count)
  return sizes, tasks


def _sections(config, recipe):
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


def _model(m):
  check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', f'{m.dtype!r} not in float32/bfloat16')
  check(m.param_dtype in ('float32', 'bfloat16'), 'model.param_dtype',
        f'{m.param_dtype!r} not in float32/bfloat16')
  check(m.remat in REMAT_POLICIES, 'model.remat', f'{m.remat!r} not in {"/".join(REMAT_POLICIES)}')
  check(m.attention in ATTENTION, 'model.attention', f'{m.attention!r} not in {"/".join(ATTENTION)}')


def _loss(loss):
  check(0.0 <= loss.label_smoothing < 1.0, 'loss.label_smoothing', 'must be in [0, 1)')
  check(loss.chunk_size >= 0, 'loss.chunk_size', 'must be >= 0')
  check(loss.impl in losses.IMPLS, 'loss.impl', f'{loss.impl!r} not in {"/".join(losses.IMPLS)}')
  check(loss.impl != 'ring' or not loss.chunk_size, 'loss.chunk_size',
        'must be 0 with loss.impl=ring (its blocks are [rows, rows] already)')


def _optim(o, model):
  check(o.name in ('adamw', 'lamb'), 'optim.name', f'{o.name!r} not in adamw/lamb')
  check(o.name != 'lamb' or not model.scan_layers, 'optim.name',
        "'lamb' scales each param by its own trust ratio, and model.scan_layers stores a run of blocks as one "
        'param (vlp.models.stacks): use adamw, or model.scan_layers=False')
  check(o.schedule in ('cosine', 'linear', 'constant'), 'optim.schedule',
        f'{o.schedule!r} not in cosine/linear/constant')
  check(o.lr > 0, 'optim.lr', 'must be > 0')
  check(all(isinstance(n, str) for n in o.no_decay), 'optim.no_decay', f'must be param names, got {o.no_decay!r}')
  check(o.warmup_steps >= 0, 'optim.warmup_steps', 'must be >= 0')


def _run(config):
  """Steps, accumulation, EMA, profiling, checkpoints and the task schedule."""
  check(config.total_steps > 0, 'total_steps', 'must be > 0')
  check(isinstance(config.accum_steps, int) and config.accum_steps >= 1, 'accum_steps', 'must be >= 1')
  check(not config.tasks or config.accum_steps == 1, 'accum_steps',
        'with config.tasks each task accumulates on its own: set tasks.<name>.accum_steps')
  check(0.0 <= config.ema_decay < 1.0, 'ema_decay', 'must be in [0, 1)')
  s = config.profile.steps
  check(not s or (len(s) == 2 and all(type(x) is int for x in s) and 0 <= s[0] < s[1]), 'profile.steps',
        f'must be () (off) or (A, B): ints, 0 <= A < B; got {s!r}')
  c = config.checkpoint
  for key, value, low in (('checkpoint.every', c.every, 1), ('checkpoint.keep', c.keep, 1),
                          ('log_every', config.log_every, 1), ('checkpoint.keep_every', c.keep_every, 0),
                          ('eval_every', config.eval_every, 0), ('checkpoint.save_timeout_s', c.save_timeout_s, 1)):
    check(value >= low, key, f'must be >= {low}')
  check(config.agd.schedule in SCHEDULES, 'agd.schedule', f'{config.agd.schedule!r} not in {"/".join(SCHEDULES)}')


def _nonfinite(cfg):
  """config.nonfinite (vlp.train.guard)."""
  check(isinstance(cfg.max_consecutive, int) and cfg.max_consecutive >= 1, 'nonfinite.max_consecutive',
        'must be an int >= 1')
  check(isinstance(cfg.spike_window, int) and cfg.spike_window >= 0, 'nonfinite.spike_window',
        'must be an int >= 0 (0: no spike warnings)')
  check(cfg.spike_zscore > 0, 'nonfinite.spike_zscore', 'must be > 0')


def _mesh_rules(rules):
  for rule in rules:
    check(len(rule) == 2, 'mesh_rules', f'{rule!r} is not a (logical axis, mesh axis) pair')
    name, axis = rule
    check(name in parallel.RULES, f'mesh_rules.{name}', f'unknown logical axis; known: {", ".join(parallel.RULES)}')
    for a in axis if isinstance(axis, (tuple, list)) else (axis,):
      check(a is None or a in MESH_AXES, f'mesh_rules.{name}', f'{a!r} is not a mesh axis {MESH_AXES}')


def _compiler(c):
  """config.compiler (vlp.core.compiler_flags): per platform, '--name=value' flags; no TPU
  compiler flag in XLA_FLAGS, whose parser would abort the run on it."""
  for key in sorted(set(c) ^ {'defaults', *compiler_flags.PLATFORMS}):
    check(False, f'compiler.{key}', 'missing' if key not in c else
          f'not a platform; known: {", ".join(compiler_flags.PLATFORMS)}')
  check(c.defaults in ('auto', 'none'), 'compiler.defaults', f'{c.defaults!r} not in auto/none')
  for platform in compiler_flags.PLATFORMS:
    flags = c[platform]
    check(isinstance(flags, (tuple, list)), f'compiler.{platform}', f"must be a tuple of '--name=value' strings, "
          f'got {flags!r}')
    for f in flags:
      check(isinstance(f, str) and compiler_flags.FLAG.fullmatch(f), f'compiler.{platform}',
            f"{f!r} is not a '--name=value' flag")
      check(platform == 'tpu' or not compiler_flags.tpu_only(f), f'compiler.{platform}',
            f"{f!r} is the TPU compiler's (libtpu): put it under compiler.tpu")


def _unknown_keys(entry, allowed, key: str, build: str):
  for k in entry:
    close = difflib.get_close_matches(k, list(allowed), n=1)
    check(k in allowed, f'{key}.{k}', 'unknown key' + (f"; did you mean '{key}.{close[0]}'?" if close else ''))
  for k in allowed:
    check(k in entry, f'{key}.{k}', f'missing (build entries with vlp.core.config.{build})')


def _evals(config):
  for name, e in config.evals.items():
    key = f'evals.{name}'
    check(isinstance(e, ml_collections.ConfigDict) and e.get('kind') in EVAL_DEFAULTS, f'{key}.kind',
          f'{e.get("kind") if isinstance(e, ml_collections.ConfigDict) else e!r}: '
          f'known kinds: {", ".join(EVAL_DEFAULTS)} (use vlp.core.config.eval_config)')
    _unknown_keys(e, EVAL_DEFAULTS[e.kind], key, 'eval_config')
    sources.validate_entry(e, key)
    check(e.num_images >= 0 and e.batch_size > 0, f'{key}.num_images', 'num_images >= 0, batch_size > 0')
    check(e.kind != 'itm_rerank' or e.rerank_k >= 1, f'{key}.rerank_k', 'must be >= 1')
    if e.kind == 'zeroshot':
      check(all('{}' in t for t in e.templates), f'{key}.templates',
            "every template needs a '{}' for the class name")


def _evals_of(config, recipe):
  """The evaluators are ones the recipe has, on data its encoders take."""
  for name, e in config.evals.items():
    key = f'evals.{name}'
    check(e.kind in recipe.eval_kinds, f'{key}.kind',
          f'{e.kind!r} is not an evaluator of {recipe.name!r}; it has {"/".join(recipe.eval_kinds)}')
    check(sources.vision_of(e.data) in recipe.modalities, f'{key}.data',
          f'{e.data!r} evaluates a {sources.vision_of(e.data)} encoder; {recipe.name!r} has none')


def _tasks(config, recipe) -> dict:
  """{name: Task}: config.tasks, or the recipe's default task (config.data at config.batch_size)."""
  if not config.tasks:
    check(not recipe.needs_tasks, 'tasks', f'model.name={recipe.name!r} trains tasks: add some with '
          'c.tasks.NAME = vlp.core.config.task_config(...)')
    cfg = ml_collections.ConfigDict(task_config(data=sources.TASK, batch_size=config.batch_size,
                                                accum_steps=config.accum_steps,
                                                label_smoothing=config.loss.label_smoothing))
    tasks = {DEFAULT_TASK: Task(DEFAULT_TASK, cfg, lambda f: _DEFAULT_KEYS.get(f, f), default=True)}
  else:
    tasks = {n: Task(n, t, lambda f, n=n: f'tasks.{n}.{"batch_size" if f == "micro" else f}')
             for n, t in sorted(config.tasks.items())}
  for t in tasks.values():
    if not t.default:
      _task(f'tasks.{t.name}', t.cfg)
    check(recipe.accumulates or t.cfg.accum_steps == 1, t.key('accum_steps'),
          f'{recipe.name!r} does not accumulate gradients over micro-batches (its Recipe.accumulates): must be 1')
  return tasks


def _task(key, t):
  """The recipe-independent checks of one task entry."""
  check(isinstance(t, ml_collections.ConfigDict), key, 'build tasks with vlp.core.config.task_config(...)')
  _unknown_keys(t, TASK_DEFAULTS, key, 'task_config')
  allowed = sources.task_data()
  check(t.data in allowed, f'{key}.data', f'{t.data!r} not in {"/".join(allowed)}')
  check(t.loss in TASK_LOSSES, f'{key}.loss', f'{t.loss!r} not in {"/".join(TASK_LOSSES)}')
  mods = tuple(t.modalities)
  want = 'a (vision, text) pair' if t.loss == 'contrastive' else 'one vision modality'
  ok = (len(mods) == 2 and mods[0] in VISION and mods[1] == 'text') if t.loss == 'contrastive' else \
      (len(mods) == 1 and mods[0] in VISION)
  check(ok, f'{key}.modalities', f'{mods!r}: a {t.loss} task takes {want}, vision in {"/".join(VISION)}')
  holds = sources.vision_of(t.data)
  check(mods[0] == holds, f'{key}.data', f'{t.data!r} holds {holds}s, the task wants {mods[0]}')
  check(t.loss != 'classification' or t.data != sources.TASK, f'{key}.data',
        f"classification needs labels: one of the built-in {'/'.join(sources.names(builtin=True))}")
  for size in t.resolutions:
    check(isinstance(size, int) and size > 0, f'{key}.resolutions', f'{size!r} is not a positive int')
  check(t.weight > 0, f'{key}.weight', 'must be > 0')
  check(isinstance(t.interval, int) and t.interval >= 1, f'{key}.interval', 'must be an int >= 1')
  check(isinstance(t.accum_steps, int) and t.accum_steps >= 1, f'{key}.accum_steps', 'must be an int >= 1')
  check(isinstance(t.batch_size, int) and t.batch_size >= 1, f'{key}.batch_size', 'must be an int >= 1')
  check(0.0 <= t.drop_token < 1.0, f'{key}.drop_token', 'must be in [0, 1)')
  check(0.0 <= t.label_smoothing < 1.0, f'{key}.label_smoothing', 'must be in [0, 1)')
  check(len(t.templates) > 0 and all('{}' in p for p in t.templates), f'{key}.templates',
        "needs templates, each with a '{}' for the class name")


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Resolves the one -1 axis size so the product equals the device count."""
  unknown = [a for a in MESH_AXES if config.mesh[a] == -1]
  check(len(unknown) <= 1, 'mesh', f'at most one axis may be -1, got {unknown}')
  for a in MESH_AXES:
    check(config.mesh[a] == -1 or (isinstance(config.mesh[a], int) and config.mesh[a] >= 1), f'mesh.{a}',
          'must be -1 or >= 1')
  sizes = {a: config.mesh[a] for a in MESH_AXES}
  known = math.prod(v for v in sizes.values() if v != -1)
  if unknown:
    check(num_devices % known == 0, f'mesh.{unknown[0]}',
          f'{num_devices} devices are not divisible by the other axes ({known})')
    sizes[unknown[0]] = num_devices // known
  check(math.prod(sizes.values()) == num_devices, 'mesh',
        f'axis sizes {sizes} multiply to {math.prod(sizes.values())}, not the {num_devices} devices')
  return sizes


def _batch_hosts(sizes, num_devices: int, process_count: int):
  """Every process feeds its own batch rows, and the batch is split over data x fsdp: the
  tensor x expert devices that share rows must lie within one process (parallel.make_mesh
  checks the real device layout)."""
  local, group = num_devices // process_count, sizes['tensor'] * sizes['expert']
  if process_count > 1 and local % group:
    key = 'mesh.tensor' if sizes['tensor'] > 1 else 'mesh.expert'
    raise ConfigError(f"config key '{key}': the tensor x expert = {group} devices of a block of batch rows do not "
                      f'fit in the {local} devices of a process ({process_count} processes): processes would feed '
                      f'the same rows; make tensor x expert divide {local}')


def param_patterns(config, abstract_params):
  """optim.frozen, optim.lr_mult and init.only each name at least one param (a typo would silently
  train a tower meant to be locked), as regular expressions over '/'-joined param names.
  Configs written before these keys existed have none."""
  names = [trees.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
  o = config.optim
  for item in o.get('lr_mult', ()):
    check(isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], (int, float))
          and item[1] > 0, 'optim.lr_mult', f'entries are (regex, factor > 0), got {item!r}')
  groups = (('optim.frozen', o.get('frozen', ())), ('optim.lr_mult', [p for p, _ in o.get('lr_mult', ())]),
            ('init.only', config.get('init', {}).get('only', ())))
  for key, patterns in groups:
    for p in patterns:
      try:
        re.compile(p)
      except (re.error, TypeError) as e:
        raise ConfigError(f"config key '{key}': {p!r} is not a regular expression ({e})") from None
      if not any(re.fullmatch(p, n) for n in names):
        tops = sorted({n.split('/')[0] for n in names})
        raise ConfigError(f"config key '{key}': {p!r} matches no param (names look like {names[0]!r}; "
                          f"top level: {', '.join(tops)})")
