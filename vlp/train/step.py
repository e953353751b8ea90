"""One compiled training step: loss, gradients (accumulated over micro-batches),
optimizer update; state donated.

A model with tasks (IMP) has one step per variant (vlp.train.agd): its task's
loss, batch shapes and micro-batches, and an update that leaves the params the
task does not touch, and their optimizer state, as they were.
"""
import functools
import time

import jax
import jax.numpy as jnp
import optax

from vlp import models, parallel
from vlp.train import agd

# The rest of the state is the model's own (ALBEF's momentum params and queues).
CORE_KEYS = ('step', 'params', 'opt_state', 'ema_params')


def micro_batches(batch, k: int):
  """[B, ...] -> [k, B/k, ...] where micro-batch j holds examples j, j+k, j+2k, ...

  Strided rather than contiguous so that every device keeps its own examples:
  with the batch split over devices, each device's rows stay on it.
  """
  return jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0), batch)


def loss_and_grads(loss_fn, params, batch, accum_steps: int):
  """Value and gradient of loss_fn, averaged over `accum_steps` micro-batches (lax.scan).

  For a contrastive loss this is the mean of the micro-batch losses, each
  contrasting its own examples only, not the loss of the whole batch.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, batch)

  def add(carry, micro):
    (loss, aux), grads = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  (loss, aux), grads = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches(batch, accum_steps)))
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (loss, aux, grads))
  (loss, aux, grads), _ = jax.lax.scan(add, zeros, micro_batches(batch, accum_steps))
  return jax.tree.map(lambda x: x / accum_steps, ((loss, aux), grads))


def make_train_step(config, setup, variant: agd.Variant | None = None):
  graphdef, tx, lr_schedule = setup.graphdef, setup.tx, setup.lr_schedule
  module = models.module(config.model)
  model_loss = module.loss_fn
  untouched = frozenset()
  if variant is not None and variant.task:
    model_loss = functools.partial(model_loss, variant=variant)
    untouched = module.untouched_params(variant, setup.abstract['params'])
  accum_steps = variant.accum_steps if variant is not None else config.accum_steps

  def train_step(state, batch):
    extra = {k: v for k, v in state.items() if k not in CORE_KEYS}

    def loss_fn(params, batch):
      return model_loss(graphdef, params, extra, batch, state['step'], config)

    # config validation keeps models with extra state at accum_steps == 1
    (loss, (aux, extra)), grads = loss_and_grads(loss_fn, state['params'], batch, accum_steps)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # a task's step leaves what it does not touch alone: no Adam drift, no weight decay
    params = agd.select_touched(params, state['params'], untouched)
    opt_state = agd.select_touched(opt_state, state['opt_state'], untouched)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': lr_schedule(state['step']), **aux}
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, **extra}
    if 'ema_params' in state:
      new['ema_params'] = optax.incremental_update(params, state['ema_params'], 1.0 - config.ema_decay)
    return new, metrics

  return train_step


def batch_spec(config, mesh, variant: agd.Variant | None = None):
  """Abstract global batch (of the variant, if given) with its sharding."""
  variant = variant or agd.variants(config)[0]
  b, size = variant.batch_size, variant.image_size
  sh = parallel.batch_sharding(mesh)
  module = models.module(config.model)
  keys = module.batch_keys(variant) if variant.task else module.BATCH_KEYS
  shapes = {'image': (b, size, size, 3), 'video': (b, variant.frames, size, size, 3)}
  spec = {}
  for k in keys:
    if k in shapes:
      spec[k] = jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=sh)
    elif k == 'label':
      spec[k] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh)
    else:  # text, MLM inputs and labels: rows of token ids
      spec[k] = jax.ShapeDtypeStruct((b, config.model.text.context_length), jnp.int32, sharding=sh)
  return spec


def compile_train_step(config, setup, variant: agd.Variant | None = None):
  """Lowers and compiles ahead of time; returns (compiled, seconds)."""
  start = time.perf_counter()
  jitted = jax.jit(
      make_train_step(config, setup, variant),
      in_shardings=(setup.shardings, parallel.batch_sharding(setup.mesh)),
      out_shardings=(setup.shardings, parallel.replicated(setup.mesh)),
      donate_argnums=0)
  with parallel.activation_rules(setup.mesh, setup.rules):  # activations pinned while tracing
    lowered = jitted.lower(setup.abstract, batch_spec(config, setup.mesh, variant))
  compiled = lowered.compile()
  return compiled, time.perf_counter() - start
