"""`config.init['from']`: start training from the params of another run or export.

The source is a vlp workdir (its newest checkpoint that restores; only the params are
read) or a `vlp export` directory (model.safetensors). Params are matched by name,
as big_vision's `model_init` and open_clip's `--pretrained` do:
- a param with the same name and shape is loaded;
- the same name with another shape is an error naming it (no silent re-init);
- params of this model the source lacks keep their fresh init, and the source's
  params this model lacks are ignored; both are listed in one line each;
- `init.only` (regexes) takes only the params it names from the source (LiT: the
  image tower, the text tower from scratch).
A recipe may name more sources (`Recipe.init_sources`: ALBEF's `init.text_from`, a BERT
import for its text stack), each with a conversion of the source's params to its own
(names, and e.g. the first rows of a longer position table); their params are taken after
init.from's.
Names are '/'-joined paths ('image/encoder/blocks/0/attn/qkv'), as `optim.frozen`
patterns see them.
"""
import re

import jax
import numpy as np

from vlp.core import paths, trees, weights_files
from vlp.core.config import ConfigError
from vlp.models import stacks
from vlp.workdir import checkpoints


def source_of(config) -> str:
  return config.get('init', {}).get('from', '')


def _read(source: str) -> dict:
  """{'/'-joined name: numpy array} of the source's params."""
  if weights_files.exists(source):
    flat = weights_files.read(source)
  elif paths.exists(paths.join(source, 'config.json')):
    _, params, _ = checkpoints.restore_params(source)
    flat = stacks.per_block({k: np.asarray(jax.device_get(v)) for k, v in trees.flatten(params)})
  else:
    raise ConfigError(f"config key 'init.from': {source} is neither a vlp workdir (config.json) nor a "
                      f'vlp export ({weights_files.SINGLE} or {weights_files.INDEX})')
  return {k.replace('.', '/'): v for k, v in flat.items()}


def _listing(names, most=50):
  return ', '.join(names[:most]) + (f' ... ({len(names) - most} more)' if len(names) > most else '')


def _given(config, sources) -> dict:
  """{this model's param name: (config key, source, array)} of init.from and the recipe's sources."""
  given = {}
  source = source_of(config)
  if source:
    params = _read(source)
    only = [re.compile(p) for p in config.init.get('only', ())]
    if only:
      params = {k: v for k, v in params.items() if any(p.fullmatch(k) for p in only)}
      if not params:
        raise ConfigError(f"config key 'init.only': {source} has no param that {list(config.init.only)} names")
    given.update({k: ('init.from', source, v) for k, v in params.items()})
  for key, src, convert in sources:
    for k, v in _read(src).items():
      if (taken := convert(k, v)) is not None:
        given[taken[0]] = (key, src, taken[1])
  return given


def load(config, abstract_params: dict, log=print, sources=()) -> dict | None:
  """The params tree of this model with every matching param of the sources (None where a
  param keeps its init); None when config.init['from'] is empty and there are no `sources`
  ([(config key, source, convert)], vlp.recipes.base.Recipe.init_sources). Params are matched
  per block: a stacked param of a scanned stack (vlp.models.stacks) is loaded when the
  sources give all of its blocks."""
  if not source_of(config) and not sources:
    return None
  given = _given(config, sources)
  stacked = {k.replace('.', '/'): x for k, x in trees.flatten(abstract_params)}
  names = {}  # per-block name -> shape
  for name, x in stacked.items():
    per = stacks.per_block_names(name)
    names.update({n: tuple(x.shape[1:] if len(per) > 1 else x.shape) for n in per})
  wrong = [n for n in names if n in given and tuple(given[n][2].shape) != names[n]]
  if wrong:
    more = f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''
    key, source, value = given[wrong[0]]
    raise ConfigError(f"config key '{key}': {source}: param {wrong[0]} has shape "
                      f'{tuple(value.shape)}, this model {names[wrong[0]]}{more}')
  missing = sorted(set(names) - set(given))
  extra = sorted(set(given) - set(names))
  froms = ', '.join(sorted({f'{key} {src}' for key, src, _ in given.values()}))
  log(f'{froms}: {len(names) - len(missing)} of {len(names)} params loaded')
  if missing:
    log(f'  kept at their init (not taken from the source): {_listing(missing)}')
  if extra:
    log(f'  in the source, not in this model (ignored): {_listing(extra)}')

  def pick(path, x):
    per = stacks.per_block_names(trees.path_name(path))
    taken = [n for n in per if n in given]
    if not taken:
      return None
    if len(taken) < len(per):
      key, source, _ = given[taken[0]]
      raise ConfigError(f"config key '{key}': {source} gives {len(taken)} of the {len(per)} blocks of the "
                        f'stacked param {trees.path_name(path)} (model.scan_layers stores them as one): '
                        'give all or none, or train with model.scan_layers=False')
    arrays = [np.asarray(given[n][2], x.dtype) for n in per]
    return np.stack(arrays) if len(per) > 1 else arrays[0]
  return jax.tree_util.tree_map_with_path(pick, abstract_params)
