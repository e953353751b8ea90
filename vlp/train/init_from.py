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


def load(config, abstract_params: dict, log=print) -> dict | None:
  """The params tree of this model with every matching param of the source (None where a
  param keeps its init); None when config.init['from'] is empty."""
  source = source_of(config)
  if not source:
    return None
  given = _read(source)
  only = [re.compile(p) for p in config.init.get('only', ())]
  if only:
    given = {k: v for k, v in given.items() if any(p.fullmatch(k) for p in only)}
    if not given:
      raise ConfigError(f"config key 'init.only': {source} has no param that {list(config.init.only)} names")
  names = {k.replace('.', '/'): x for k, x in checkpoint.flatten(abstract_params)}
  wrong = [n for n, x in names.items() if n in given and tuple(given[n].shape) != tuple(x.shape)]
  if wrong:
    more = f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''
    raise ConfigError(f"config key 'init.from': {source}: param {wrong[0]} has shape "
                      f'{tuple(given[wrong[0]].shape)}, this model {tuple(names[wrong[0]].shape)}{more}')
  missing = sorted(set(names) - set(given))
  extra = sorted(set(given) - set(names))
  log(f'init.from {source}: {len(names) - len(missing)} of {len(names)} params loaded')
  if missing:
    log(f'  kept at their init (not taken from the source): {_listing(missing)}')
  if extra:
    log(f'  in the source, not in this model (ignored): {_listing(extra)}')

  def pick(path, x):
    name = optim.path_name(path)
    return np.asarray(given[name], x.dtype) if name in given else None
  return jax.tree_util.tree_map_with_path(pick, abstract_params)
