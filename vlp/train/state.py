"""The train state: a plain dict {step, params, opt_state, [ema_params], ...}, sharded by logical rules.

With `config.ema_decay > 0` the state also holds an exponential moving
average of the params (sharded like them), updated in the step, for export.
The model's module may add entries (`init_extra_state`: ALBEF's momentum
params and feature queues); an entry whose path ends like a parameter's takes
that parameter's sharding, anything else (the queues) is replicated.

Shapes and shardings come from `jax.eval_shape` before anything is allocated
(MaxText style); the real state is then created directly in its sharded layout.
Params and optimizer state are kept in `model.param_dtype` (float32 master
weights by default) whatever the compute dtype `model.dtype`: the layers cast
the weights to the compute dtype where they use them.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlp import models, parallel
from vlp.train import optim


@dataclasses.dataclass
class Setup:
  graphdef: nnx.GraphDef
  tx: object  # optax.GradientTransformation
  lr_schedule: object
  abstract: dict  # ShapeDtypeStructs of the state, with shardings
  shardings: dict
  mesh: jax.sharding.Mesh
  rules: dict  # logical -> mesh axes (vlp.parallel.rules_from)


def _params_of(model, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def make_setup(config, mesh) -> Setup:
  tx, lr = optim.make(config.optim, config.total_steps)
  rules = parallel.rules_from(config)
  abstract_model = nnx.eval_shape(lambda: models.build(config.model, config.seed))
  graphdef, abstract_vars = nnx.split(abstract_model, nnx.Param)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_vars))
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.model.param_dtype),
                                 nnx.to_pure_dict(abstract_vars))
  param_sh = parallel.tree_shardings(logical, abstract_params, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  abstract_extra = jax.eval_shape(lambda p: models.module(config.model).init_extra_state(config, p),
                                  abstract_params)
  shardings = {
      'step': parallel.replicated(mesh),
      'params': param_sh,
      'opt_state': parallel.like_params_shardings(abstract_opt, param_sh, mesh),
      **parallel.like_params_shardings(abstract_extra, param_sh, mesh),
  }
  shapes = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params, 'opt_state': abstract_opt,
            **abstract_extra}
  if has_ema(config):
    shardings['ema_params'], shapes['ema_params'] = param_sh, abstract_params
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return Setup(graphdef, tx, lr, abstract, shardings, mesh, rules)


def has_ema(config) -> bool:
  return config.get('ema_decay', 0.0) > 0  # configs saved before EMA existed have no key


def init_state(config, setup: Setup) -> dict:
  """Initialises params and optimizer state directly in their sharded layout."""
  def init():
    params = _params_of(models.build(config.model, config.seed), config.model.param_dtype)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': setup.tx.init(params),
             **models.module(config.model).init_extra_state(config, params)}
    if has_ema(config):
      state['ema_params'] = params
    return state
  return jax.jit(init, out_shardings=setup.shardings)()
