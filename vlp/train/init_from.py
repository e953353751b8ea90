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

from vlp import checkpoint, export, paths, weights_files
from vlp.config import ConfigError
from vlp.train import optim

def source_of(config) -> str:
  return config.get('init', {}).get('from', '')


def _read(source: str) -> dict:
  """{'/'-joined name: numpy array} of the source's params."""
  if weights_files.exists(source):
    flat = weights_files.read(source)
  elif paths.exists(paths.join(source, 'config.json')):
    _, params, _ = export.restore_params(source)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in checkpoint.flatten(params)}
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
  ([(config key, source, convert)], vlp.recipes.base.Recipe.init_sources)."""
  if not source_of(config) and not sources:
    return None
  given = _given(config, sources)
  names = {k.replace('.', '/'): x for k, x in checkpoint.flatten(abstract_params)}
  wrong = [n for n in names if n in given and tuple(given[n][2].shape) != tuple(names[n].shape)]
  if wrong:
    more = f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''
    key, source, value = given[wrong[0]]
    raise ConfigError(f"config key '{key}': {source}: param {wrong[0]} has shape "
                      f'{tuple(value.shape)}, this model {tuple(names[wrong[0]].shape)}{more}')
  missing = sorted(set(names) - set(given))
  extra = sorted(set(given) - set(names))
  froms = ', '.join(sorted({f'{key} {src}' for key, src, _ in given.values()}))
  log(f'{froms}: {len(names) - len(missing)} of {len(names)} params loaded')
  if missing:
    log(f'  kept at their init (not taken from the source): {_listing(missing)}')
  if extra:
    log(f'  in the source, not in this model (ignored): {_listing(extra)}')

  def pick(path, x):
    name = optim.path_name(path)
    return np.asarray(given[name][2], x.dtype) if name in given else None
  return jax.tree_util.tree_map_with_path(pick, abstract_params)
