"""Models are looked up by `config.model.name`."""
import importlib

from flax import nnx


def module(model_cfg):
  """The model's module: its `Model`, and the training hooks `BATCH_KEYS`,
  `init_extra_state(config, params)` and `loss_fn(graphdef, params, extra, batch, step, config)`."""
  return importlib.import_module(f'vlp.models.{model_cfg.name}')


def build(model_cfg, seed: int = 0):
  return module(model_cfg).Model(model_cfg, rngs=nnx.Rngs(seed))
