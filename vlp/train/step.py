"""One compiled training step: loss, gradients (accumulated over micro-batches),
optimizer update; state donated."""
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vlp import losses, parallel
from vlp.models import moe

MAX_LOGIT_SCALE = 100.0  # as CLIP: keeps a runaway temperature from destabilising training


def contrastive_loss(model, batch, model_cfg, loss_cfg):
  # capture: what MoE layers report of the pass (vlp.models.moe)
  (image_emb, text_emb), intermediates = nnx.capture(lambda m, i, t: m(i, t), nnx.Intermediate)(
      model, batch['image'], batch['text'])
  scale = jnp.minimum(model.logit_scale(), MAX_LOGIT_SCALE)
  chunk = loss_cfg.chunk_size
  if model_cfg.head == 'softmax':
    if chunk:
      loss = losses.chunked_softmax_contrastive(image_emb, text_emb, scale, loss_cfg.label_smoothing, chunk)
    else:
      loss = losses.softmax_contrastive(image_emb, text_emb, scale, loss_cfg.label_smoothing)
  elif chunk:
    loss = losses.chunked_sigmoid_contrastive(image_emb, text_emb, scale, model.logit_bias(), chunk)
  else:
    loss = losses.sigmoid_contrastive(image_emb, text_emb, scale, model.logit_bias())
  moe_loss, moe_metrics = moe.aux_losses(intermediates, {'load_balance': loss_cfg.moe_load_balance,
                                                         'router_z': loss_cfg.moe_router_z})
  metrics = {'logit_scale': scale}
  if moe_metrics:  # an MoE model: the loss includes its auxiliary losses
    metrics.update(contrastive_loss=loss, **moe_metrics)
  return loss + moe_loss, metrics


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

  def train_step(state, batch):
    def loss_fn(params, batch):
      return contrastive_loss(nnx.merge(graphdef, params), batch, config.model, config.loss)

    (loss, aux), grads = loss_and_grads(loss_fn, state['params'], batch, config.accum_steps)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': lr_schedule(state['step']), **aux}
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    if 'ema_params' in state:
      new['ema_params'] = optax.incremental_update(params, state['ema_params'], 1.0 - config.ema_decay)
    return new, metrics

  return train_step


def batch_spec(config, mesh):
  """Abstract global batch with its sharding."""
  b = config.batch_size
  im, tx = config.model.image, config.model.text
  sh = parallel.batch_sharding(mesh)
  return {
      'image': jax.ShapeDtypeStruct((b, im.image_size, im.image_size, 3), jnp.float32, sharding=sh),
      'text': jax.ShapeDtypeStruct((b, tx.context_length), jnp.int32, sharding=sh),
  }


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
