"""Models are looked up by `config.model.name`."""
import importlib

from flax import nnx


def build(model_cfg, seed: int = 0):
  module = importlib.import_module(f'vlp.models.{model_cfg.name}')
  return module.Model(model_cfg, rngs=nnx.Rngs(seed))
