"""One compiled training step: loss, gradients (accumulated over micro-batches),
optimizer update; state donated."""
import time

import jax
import jax.numpy as jnp
import optax

from vlp import models, parallel

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


def make_train_step(config, setup):
  graphdef, tx, lr_schedule = setup.graphdef, setup.tx, setup.lr_schedule
  model_loss = models.module(config.model).loss_fn

  def train_step(state, batch):
    extra = {k: v for k, v in state.items() if k not in CORE_KEYS}

    def loss_fn(params, batch):
      return model_loss(graphdef, params, extra, batch, state['step'], config)

    # config validation keeps models with extra state at accum_steps == 1
    (loss, (aux, extra)), grads = loss_and_grads(loss_fn, state['params'], batch, config.accum_steps)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': lr_schedule(state['step']), **aux}
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, **extra}
    if 'ema_params' in state:
      new['ema_params'] = optax.incremental_update(params, state['ema_params'], 1.0 - config.ema_decay)
    return new, metrics

  return train_step


def batch_spec(config, mesh):
  """Abstract global batch with its sharding."""
  b = config.batch_size
  im, tx = config.model.image, config.model.text
  sh = parallel.batch_sharding(mesh)
  text = jax.ShapeDtypeStruct((b, tx.context_length), jnp.int32, sharding=sh)
  spec = {'image': jax.ShapeDtypeStruct((b, im.image_size, im.image_size, 3), jnp.float32, sharding=sh)}
  # every other key (text, MLM inputs and labels) is a row of token ids
  return spec | {k: text for k in models.module(config.model).BATCH_KEYS if k != 'image'}


def compile_train_step(config, setup):
  """Lowers and compiles ahead of time; returns (compiled, seconds)."""
  start = time.perf_counter()
  jitted = jax.jit(
      make_train_step(config, setup),
      in_shardings=(setup.shardings, parallel.batch_sharding(setup.mesh)),
      out_shardings=(setup.shardings, parallel.replicated(setup.mesh)),
      donate_argnums=0)
  with parallel.activation_rules(setup.mesh, setup.rules):  # activations pinned while tracing
    lowered = jitted.lower(setup.abstract, batch_spec(config, setup.mesh))
  compiled = lowered.compile()
  return compiled, time.perf_counter() - start
