"""One compiled training step per variant of the plan: the recipe's loss on the variant's
batch, gradients (accumulated over its micro-batches), the optimizer update; state donated.

The update leaves the params the variant's task does not touch, and their
optimizer state, as they were (vlp.train.agd.select_touched). A step whose loss
or gradient norm is not finite leaves the whole state as it was, bar the step
counter (vlp.train.guard; `config.nonfinite.guard`).
"""
import time

import jax
import jax.numpy as jnp
import optax

from vlp.core import parallel
from vlp.train import agd, guard, optim


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


def make_train_step(plan, setup, variant):
  config, recipe = plan.config, plan.recipe
  graphdef, tx, lr_schedule = setup.graphdef, setup.tx, setup.lr_schedule
  untouched = recipe.untouched_params(variant, setup.abstract['params'])
  guarded = config.nonfinite.guard
  frozen = optim.frozen_mask(config.optim, setup.abstract['params'])  # Python bools: a static choice

  def train_step(state, batch):
    model_state = state['model_state'] if setup.has_model_state else {}

    def loss_fn(params, batch):
      # no gradient reaches a frozen param, so XLA drops the backward pass of a frozen tower
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
      with jax.named_scope('loss'):  # the forward pass and the loss; its gradient: transpose(jvp(loss))
        return recipe.loss(graphdef, params, model_state, batch, state['step'], config, variant)

    # a recipe whose model state moves once per step declares it cannot accumulate (Recipe.accumulates)
    (loss, (aux, model_state)), grads = loss_and_grads(loss_fn, state['params'], batch, variant.accum_steps)
    with jax.named_scope('optimizer'):  # the update's ops, as profiles name them (vlp.bench.categories)
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      params = optax.apply_updates(state['params'], updates)
      params = jax.tree.map(lambda new, old, f: old if f else new, params, state['params'], frozen)  # bit for bit
      # a task's step leaves what it does not touch alone: no Adam drift, no weight decay
      params = agd.select_touched(params, state['params'], untouched)
      opt_state = agd.select_touched(opt_state, state['opt_state'], untouched)
    grad_norm = optax.tree.norm(grads)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': lr_schedule(state['step']), **aux}
    new = {'params': params, 'opt_state': opt_state}
    if 'ema_params' in state:
      new['ema_params'] = optax.incremental_update(params, state['ema_params'], 1.0 - config.ema_decay)
    if setup.has_model_state:
      new['model_state'] = model_state
    if guarded:  # a non-finite step changes nothing but the step counter (vlp.train.guard)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      new = guard.keep_if(finite, new, {k: state[k] for k in new})
      metrics['nonfinite'] = 1.0 - finite.astype(jnp.float32)
    return {'step': state['step'] + 1, **new}, metrics

  return train_step


def compile_train_step(plan, setup, variant):
  """Lowers and compiles ahead of time; returns (compiled, seconds)."""
  start = time.perf_counter()
  jitted = jax.jit(
      make_train_step(plan, setup, variant),
      in_shardings=(setup.shardings, parallel.batch_sharding(setup.mesh)),
      out_shardings=(setup.shardings, parallel.replicated(setup.mesh)),
      donate_argnums=0)
  with parallel.activation_rules(setup.mesh, setup.rules):  # activations pinned while tracing
    lowered = jitted.lower(setup.abstract, plan.batch_spec(variant, setup.mesh))
  compiled = lowered.compile()
  return compiled, time.perf_counter() - start
