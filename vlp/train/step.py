"""One compiled training step: loss, gradients, optimizer update; state donated."""
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vlp import losses, parallel

MAX_LOGIT_SCALE = 100.0  # as CLIP: keeps a runaway temperature from destabilising training


def contrastive_loss(model, batch, model_cfg, loss_cfg):
  image_emb, text_emb = model(batch['image'], batch['text'])
  scale = jnp.minimum(model.logit_scale(), MAX_LOGIT_SCALE)
  if model_cfg.head == 'softmax':
    loss = losses.softmax_contrastive(image_emb, text_emb, scale, loss_cfg.label_smoothing)
  else:
    loss = losses.sigmoid_contrastive(image_emb, text_emb, scale, model.logit_bias())
  return loss, {'logit_scale': scale}


def make_train_step(config, setup):
  graphdef, tx, lr_schedule = setup.graphdef, setup.tx, setup.lr_schedule

  def train_step(state, batch):
    def loss_fn(params):
      return contrastive_loss(nnx.merge(graphdef, params), batch, config.model, config.loss)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
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
  compiled = jitted.lower(setup.abstract, batch_spec(config, setup.mesh)).compile()
  return compiled, time.perf_counter() - start
