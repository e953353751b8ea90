"""The workdir's config.json: written on a run's first start; on a resume, the model and
the data stream its checkpoints belong to must be the same (else WorkdirMismatch before
anything is compiled); and read back by eval, export and init.from."""
import json

import jax
import ml_collections

from vlp import recipes
from vlp.checkpoint import WorkdirMismatch
from vlp.core import config as config_lib, paths, trees
from vlp.workdir import layout

# Config keys a resume must keep: the model (shapes and meaning of the params)
# and everything that defines the data stream the iterator state points into;
# plus the recipe's own (recipe.identity_keys).
IDENTITY_KEYS = ('model', 'ema_decay', 'seed', 'batch_size', 'data.name', 'data.train', 'data.tfds.name',
                 'data.tfds.train_split', 'data.languages', 'data.tokenizer', 'data.num_workers',
                 'data.crop_scale', 'data.flip', 'data.cycle_length', 'data.shuffle_window', 'tasks', 'agd')
# Model keys a resume may change: how the blocks run, not what the params are (a checkpoint's
# block stacks restore into either layout: vlp.checkpoint)
FREE_KEYS = ('model.scan_layers', 'model.remat')


def check_workdir(config, workdir: str):
  """Writes config.json on the first run; on a resume, refuses another model."""
  path = layout.path(workdir, layout.CONFIG)
  current = json.loads(config.to_json())
  if paths.exists(path) and paths.isdir(layout.path(workdir, layout.CHECKPOINTS)):
    with paths.open(path) as f:
      saved = json.load(f)
    # a key the saved config lacks was added to vlp since: that run had its default
    defaults = json.loads(_defaults(saved).to_json())
    old, new = {**dict(trees.flatten(defaults)), **dict(trees.flatten(saved))}, dict(trees.flatten(current))
    identity = IDENTITY_KEYS + recipes.get(config.model.name).identity_keys
    for k in sorted(set(old) | set(new), key=lambda k: (not k.startswith('model.'), k)):  # model first
      if k.startswith(identity) and k not in FREE_KEYS and _norm(old.get(k)) != _norm(new.get(k)):
        what = 'of another model' if k.startswith(('model.', 'ema_decay')) else 'of another data stream'
        raise WorkdirMismatch(
            f'workdir {workdir} holds a checkpoint {what} ({k} is {old.get(k)!r} there, '
            f'{new.get(k)!r} here); use a new --workdir or the same config')
  paths.makedirs(workdir)
  if jax.process_index() == 0:  # one writer on a shared file system
    # atomically: the other processes may be reading the previous run's file right now
    paths.write_atomic(path, json.dumps(current, indent=2))


def _norm(v):
  return list(v) if isinstance(v, (list, tuple)) else v


def _defaults(saved: dict) -> ml_collections.ConfigDict:
  """The base config of the saved run's recipe (ALIGN for workdirs from before recipes)."""
  return recipes.base_config(saved.get('model', {}).get('name', 'align'))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's run was started with, on top of today's defaults, so a workdir
  written before a key existed (e.g. the expert mesh axis, param_dtype) still loads; JSON
  lists go back to tuples."""
  path = layout.path(workdir, layout.CONFIG)
  if not paths.exists(path):
    raise FileNotFoundError(f'{workdir} has no {layout.CONFIG}: is it a vlp workdir?')
  with paths.open(path) as f:
    saved = json.load(f)
  config = _defaults(saved)
  for name, entry in saved.get('evals', {}).items():  # evaluators the config added: their defaults first
    if name not in config.evals and entry.get('kind') in config_lib.EVAL_DEFAULTS:
      config.evals[name] = config_lib.eval_config(entry['kind'])
  for name in saved.get('tasks', {}):  # likewise tasks
    config.tasks[name] = config_lib.task_config()
  for key, value in trees.flatten(saved):
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict) and leaf in node:
      node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
  return config
