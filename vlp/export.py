"""Inference weights: safetensors (one file, or shards with an index) + model config + tokenizer +
jax.export'ed encoders.

The encoders are serialized StableHLO (`jax.export`) with the weights as
arguments, in `param_keys` order, and a symbolic batch dimension: anyone with
jax can run them on any batch size without vlp's model code
(`vlp.pretrained`), for CPU, GPU and TPU.
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vlp import recipes
from vlp.core import paths, trees, weights_files
from vlp.data import tokenizer as tokenizer_lib, hub_tokenizer
from vlp.models import stacks
from vlp.workdir import checkpoints

CONFIG, TOKENIZER = 'config.json', 'tokenizer.model'
PLATFORMS = ('cpu', 'cuda', 'tpu')


def encoder_file(kind: str) -> str:
  """'image' -> image_encoder.jax_exported; config.json names it under 'image_encoder'."""
  return f'{kind}_encoder.jax_exported'


def export_encoders(model_cfg, keys, dtype, platforms=PLATFORMS) -> dict:
  """{kind: serialized jax.export} of the recipe's encoders (image and text; IMP: video too).

  Each is f(weights, inputs): weights a list in `keys` order, stored dtype
  (cast to float32 inside, as `load` does); inputs images float32
  [B, S, S, 3] in [-1, 1], clips float32 [B, T, S, S, 3] or tokens int32
  [B, L], B symbolic.
  """
  recipe = recipes.get(model_cfg.name)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: recipe.build(export_model(model_cfg))), nnx.Param)
  shapes = dict(trees.flatten(nnx.to_pure_dict(abstract)))
  weights = [jax.ShapeDtypeStruct(shapes[k].shape, jnp.dtype(dtype)) for k in keys]
  (b,) = jax.export.symbolic_shape('b')

  def encoder(method):
    def fn(flat, x):
      params = trees.unflatten({k: v.astype(jnp.float32) for k, v in zip(keys, flat)})
      return getattr(nnx.merge(graphdef, params), method)(x)
    return jax.jit(fn)

  out = {}
  for kind, (method, shape, input_dtype) in recipe.export_encoders(model_cfg).items():
    spec = jax.ShapeDtypeStruct((b, *shape), input_dtype)
    out[kind] = jax.export.export(encoder(method), platforms=platforms)(weights, spec).serialize()
  return out


def export(workdir: str, out: str, step=None, dtype: str = 'float32', weights: str = 'params',
           max_shard_bytes: int = weights_files.MAX_SHARD_BYTES) -> str:
  """The export directory of a workdir's checkpoint; in a multi-process job every process runs it
  (each restores its own shards of the params, and writes its share of the weight files)."""
  config, params, step = checkpoints.restore_params(workdir, step, weights)
  return write(out, config.model, stacks.per_block(dict(trees.flatten(params))), dtype,
               tokenizer_lib.for_config(config).model_path, {'step': step, 'weights': weights}, max_shard_bytes)


def export_model(model_cfg):
  """The model an export's weights and encoders are for: params named per block (a scanned
  stack stores its runs stacked: vlp.models.stacks), attention as XLA's ops (which every
  platform lowers, cuDNN's kernel only a GPU). The same encoders either way."""
  if not model_cfg.get('scan_layers', False) and model_cfg.get('attention', 'xla') == 'xla':
    return model_cfg
  model_cfg = model_cfg.copy_and_resolve_references()
  model_cfg.scan_layers, model_cfg.attention = False, 'xla'
  return model_cfg


def write(out: str, model_cfg, flat: dict, dtype: str = 'float32', tokenizer_path: str = '', meta=None,
          max_shard_bytes: int = weights_files.MAX_SHARD_BYTES) -> str:
  """Writes an export directory of `flat` ({dotted name per block: numpy array, or jax array
  sharded over the devices}) for the model config: the weights (vlp.core.weights_files: each tensor gathered only
  as its shard is written), then on process 0 the encoders, the tokenizer (when there is one)
  and config.json with `meta`, written last: a directory with a config.json is complete."""
  meta = dict(meta or {})
  paths.makedirs(out)  # local or remote (gs://); every file is written whole
  specs = {k: (tuple(v.shape), dtype) for k, v in flat.items()}
  weights_files.write(out, specs, lambda k: _on_host(flat[k]), {'step': meta.get('step')}, max_shard_bytes,
                      jax.process_count(), jax.process_index())
  if jax.process_index() == 0:
    if tokenizer_path:  # a SentencePiece model, or a BERT import's tokenizer.json under its own name
      paths.copy(tokenizer_path, paths.join(out, hub_tokenizer.FILE if tokenizer_path.endswith('.json') else TOKENIZER))
    keys = sorted(flat)
    encoders = export_encoders(model_cfg, keys, dtype)
    for kind, blob in encoders.items():
      paths.write_atomic(paths.join(out, encoder_file(kind)), bytes(blob))
    with paths.open(paths.join(out, CONFIG), 'w') as f:
      json.dump({'model': model_cfg.to_dict(), **meta, 'dtype': dtype, 'param_keys': keys,
                 **{f'{kind}_encoder': encoder_file(kind) for kind in encoders}}, f, indent=2, default=list)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vlp export: every weight file written')
  return out


def _on_host(x) -> np.ndarray:
  """A whole tensor in host memory: a sharded array spanning processes is gathered (a collective
  every process joins), a local one copied."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def load(path: str):
  """Returns (model, tokenizer) of an exported directory; model.encode_image / encode_text."""
  from vlp.data.tokenizer import Tokenizer
  with paths.open(paths.join(path, CONFIG)) as f:
    meta = json.load(f)
  model_cfg = ml_collections.ConfigDict(meta['model'])
  model = recipes.get(model_cfg.name).build(export_model(model_cfg))
  graphdef, abstract = nnx.split(model, nnx.Param)
  params = trees.unflatten(weights_files.read(path))
  expected = nnx.to_pure_dict(abstract)
  if jax.tree.structure(expected) != jax.tree.structure(params):
    raise ValueError(f'{path}: weights do not match the model config')
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  tokenizer = paths.join(path, TOKENIZER)  # an import (`vlp import`) keeps its source's token ids
  return nnx.merge(graphdef, params), Tokenizer(tokenizer) if paths.exists(tokenizer) else None
