"""The train state: a plain dict, sharded by logical rules:

  {'step', 'params', 'opt_state', ['ema_params'], ['model_state']}

With `config.ema_decay > 0` the state also holds an exponential moving
average of the params (sharded like them), updated in the step, for export.
`model_state` is the recipe's own (`init_model_state`: ALBEF's momentum
params and feature queues); a leaf whose path ends like a parameter's takes
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

from vlp.core import parallel
from vlp.train import optim


@dataclasses.dataclass
class Setup:
  graphdef: nnx.GraphDef
  tx: object  # optax.GradientTransformation
  lr_schedule: object
  abstract: dict  # ShapeDtypeStructs of the state, with shardings
  shardings: dict
  mesh: jax.sharding.Mesh
  rules: dict  # logical -> mesh axes (vlp.core.parallel.rules_from)
  has_model_state: bool = False  # the recipe keeps state besides params (Recipe.init_model_state)


def _params_of(model, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def make_setup(plan, mesh) -> Setup:
  config, recipe = plan.config, plan.recipe
  tx, lr = optim.make(config.optim, config.total_steps)
  params = plan.params(mesh)
  abstract_params, param_sh = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params.abstract), \
      params.shardings
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  shardings = {'step': parallel.replicated(mesh), 'params': param_sh,
               'opt_state': parallel.like_params_shardings(abstract_opt, param_sh, mesh)}
  shapes = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_params, 'opt_state': abstract_opt}
  if has_ema(config):
    shardings['ema_params'], shapes['ema_params'] = param_sh, abstract_params
  abstract_model_state = jax.eval_shape(lambda p: recipe.init_model_state(config, p), abstract_params)
  if abstract_model_state:
    shapes['model_state'] = abstract_model_state
    shardings['model_state'] = parallel.like_params_shardings(abstract_model_state, param_sh, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return Setup(params.graphdef, tx, lr, abstract, shardings, mesh, params.rules, 'model_state' in shapes)


def has_ema(config) -> bool:
  return config.get('ema_decay', 0.0) > 0  # configs saved before EMA existed have no key


def init_state(plan, setup: Setup, loaded=None) -> dict:
  """Initialises params and optimizer state directly in their sharded layout; `loaded` (the
  params tree of vlp.train.init_from, None where a param keeps its init) replaces the fresh
  params before the optimizer, EMA and model state are made from them."""
  config = plan.config

  def init(loaded):
    params = _params_of(plan.recipe.build(config.model, config.seed), config.model.param_dtype)
    if loaded is not None:
      params = jax.tree.map(lambda fresh, given: fresh if given is None else given, params, loaded)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': setup.tx.init(params)}
    if has_ema(config):
      state['ema_params'] = params
    model_state = plan.recipe.init_model_state(config, params)
    if model_state:
      state['model_state'] = model_state
    return state
  return jax.jit(init, out_shardings=setup.shardings)(loaded)
