"""Inference weights: safetensors + model config + tokenizer, loadable without the train state."""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from flax import nnx

from vlp import checkpoint, config as config_lib, models, parallel, tasks
from vlp.train import state as state_lib

WEIGHTS, CONFIG, TOKENIZER = 'model.safetensors', 'config.json', 'tokenizer.model'


def _unflatten(flat):
  tree = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[int(leaf) if leaf.isdigit() else leaf] = v
  return tree


def restore_params(workdir: str, step=None):
  """Params of a workdir's checkpoint (latest, or `step`) and its config."""
  config = checkpoint.load_workdir_config(workdir)
  mesh = parallel.make_mesh(config_lib.mesh_shape(config, jax.device_count()))
  setup = state_lib.make_setup(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir} has no checkpoint to export')
  state = ckpt.restore(step, setup.abstract)
  ckpt.close()
  return config, state['params'], step


def export(workdir: str, out: str, step=None, dtype: str = 'float32') -> str:
  config, params, step = restore_params(workdir, step)
  os.makedirs(out, exist_ok=True)
  flat = {k: np.asarray(jax.device_get(v)).astype(dtype) for k, v in checkpoint.flatten(params)}
  safetensors.numpy.save_file(flat, os.path.join(out, WEIGHTS), metadata={'step': str(step)})
  shutil.copyfile(tasks.tokenizer_for(config).model_path, os.path.join(out, TOKENIZER))
  with open(os.path.join(out, CONFIG), 'w') as f:
    json.dump({'model': config.model.to_dict(), 'step': step, 'dtype': dtype}, f, indent=2, default=list)
  return out


def load(path: str):
  """Returns (model, tokenizer) of an exported directory; model.encode_image / encode_text."""
  from vlp.data.tokenizer import Tokenizer
  with open(os.path.join(path, CONFIG)) as f:
    meta = json.load(f)
  model_cfg = ml_collections.ConfigDict(meta['model'])
  model = models.build(model_cfg)
  graphdef, abstract = nnx.split(model, nnx.Param)
  params = _unflatten(safetensors.numpy.load_file(os.path.join(path, WEIGHTS)))
  expected = nnx.to_pure_dict(abstract)
  if jax.tree.structure(expected) != jax.tree.structure(params):
    raise ValueError(f'{path}: weights do not match the model config')
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  return nnx.merge(graphdef, params), Tokenizer(os.path.join(path, TOKENIZER))
