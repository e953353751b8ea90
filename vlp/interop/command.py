"""`vlp import SRC --out=DIR [--format=open_clip]`: another framework's checkpoint as a vlp export.

The result is an export directory like `vlp export` writes (weights, config, jax.export'ed
encoders), so `vlp.load_pretrained(DIR)` runs it and `--config.init.from=DIR` trains from it
(LiT: lock its image tower with optim.frozen). An import keeps its source's token ids (no
SentencePiece model is written) and records the source's pixel normalisation.
"""
import json

import jax
from flax import nnx

from vlp import checkpoint, export, paths, recipes
from vlp.interop import open_clip

FORMATS = ('open_clip', 'hf', 'big_vision')


def detect(src: str) -> str:
  if open_clip.is_open_clip(src):
    return 'open_clip'
  if src.endswith('.npz'):
    return 'big_vision'
  if paths.exists(paths.join(src, 'config.json')):
    with paths.open(paths.join(src, 'config.json')) as f:
      if 'architectures' in json.load(f):
        return 'hf'
  raise ValueError(f'vlp import: {src} is not an open_clip directory ({open_clip.CONFIG}), a transformers '
                   'directory or a big_vision .npz')


def _check_against_model(flat: dict, model_cfg, src: str):
  """The converted params are exactly the model's: the same names and shapes."""
  abstract = nnx.eval_shape(lambda: recipes.get(model_cfg.name).build(model_cfg))
  want = {k: tuple(x.shape) for k, x in checkpoint.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if want != got:
    diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
    raise ValueError(f'vlp import: {src} does not convert to the model it describes: '
                     + ', '.join(f'{k} {got.get(k)} (model: {want.get(k)})' for k in diff[:5]))


def run(src: str, out: str, fmt: str | None = None, dtype: str = 'float32') -> str:
  fmt = fmt or detect(src)
  if fmt != 'open_clip':
    raise ValueError(f'vlp import: --format={fmt} is not supported yet; vlp imports open_clip checkpoints '
                     f'({open_clip.CONFIG} + {open_clip.WEIGHTS})')
  updates, normalization = open_clip.model_config(src)
  model_cfg = recipes.base_config('align').model
  for key in ('image', 'text', 'arch'):
    model_cfg[key].update(updates.pop(key))
  model_cfg.update(updates)
  params = open_clip.convert(open_clip.read_state(src), model_cfg)
  flat = {k: jax.numpy.asarray(v) for k, v in checkpoint.flatten(params)}
  _check_against_model(flat, model_cfg, src)
  return export.write(out, model_cfg, flat, dtype, meta={'step': 0, 'source': src, 'format': fmt,
                                                        'preprocess': normalization})
