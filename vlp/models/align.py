"""ALIGN-style dual encoder with a softmax (ALIGN/CLIP) or sigmoid (SigLIP) head.

`init_extra_state` and `loss_fn` are the model's hooks into vlp.train: a dual
encoder keeps nothing in the train state besides its params.
"""
import math

import jax.numpy as jnp
from flax import nnx

from vlp import losses
from vlp.models import layers, moe
from vlp.models.text import TextEncoder
from vlp.models.vit import ViT


BATCH_KEYS = ('image', 'text')  # what a training batch holds
MAX_LOGIT_SCALE = 100.0  # as CLIP: keeps a runaway temperature from destabilising training


def _l2_normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class Model(nnx.Module):

  def __init__(self, cfg, *, rngs):
    dtype = jnp.dtype(cfg.dtype)
    remat = cfg.get('remat', 'none')  # exported configs of inference models have no remat
    self.image = ViT(**cfg.image, rngs=rngs, dtype=dtype, remat=remat)
    self.text = TextEncoder(**cfg.text, rngs=rngs, dtype=dtype, remat=remat)
    self.image_proj = layers.Dense(cfg.image.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs,
                                   use_bias=False, dtype=dtype)
    self.text_proj = layers.Dense(cfg.text.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs,
                                  use_bias=False, dtype=dtype)
    self.head = cfg.head
    # logit_scale = exp(t). ALIGN learns the temperature from 1.0 (t = 0);
    # SigLIP starts at t' = log 10 with bias -10.
    t0 = 0.0 if cfg.head == 'softmax' else math.log(10.0)
    self.log_scale = nnx.Param(jnp.asarray(t0, jnp.float32))
    self.bias = nnx.Param(jnp.asarray(-10.0, jnp.float32)) if cfg.head == 'sigmoid' else None

  def encode_image(self, images):
    return _l2_normalize(self.image_proj(self.image(images)))

  def encode_text(self, tokens):
    return _l2_normalize(self.text_proj(self.text(tokens)))

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)

  def logit_scale(self):
    return jnp.exp(self.log_scale[...])

  def logit_bias(self):
    return self.bias[...] if self.bias is not None else None


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


def init_extra_state(config, params):
  del config, params
  return {}


def loss_fn(graphdef, params, extra, batch, step, config):
  """Returns (loss, (metrics, new extra state)) as every model's loss_fn."""
  del step
  loss, metrics = contrastive_loss(nnx.merge(graphdef, params), batch, config.model, config.loss)
  return loss, (metrics, extra)
