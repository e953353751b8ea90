"""ALBEF's losses (Li et al. 2021; salesforce/ALBEF models/model_pretrain.py).

ITC with momentum distillation against feature queues, ITM on hard negatives
sampled from the contrastive similarities, and MLM distilled from the momentum
model. Everything is over the global batch: under `jax.jit` with a sharded
batch, XLA gathers what each product needs.
"""
import jax
import jax.numpy as jnp

from vlp.recipes.albef.masking import IGNORE_INDEX


def _soft_cross_entropy(logits, targets):
  """Mean over rows of -sum_j targets_ij log softmax(logits)_ij."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha):
  """Image-text contrastive loss with momentum distillation.

  Online features [B, D] are compared with [momentum features of the batch ;
  queue] ([B + Q, D], all L2-normalised) over `temp`. The targets mix the
  momentum model's softmax over the same candidates (weight alpha) with the
  one-hot of the positive (the batch's own pair, column i of row i).
  Returns (loss, sim_i2t [B, B+Q], sim_t2i [B, B+Q]); the similarities feed
  the hard-negative sampling of ITM.
  """
  f32 = lambda x: x.astype(jnp.float32)
  text_all = jnp.concatenate([f32(text_feat_m), f32(text_queue)])
  image_all = jnp.concatenate([f32(image_feat_m), f32(image_queue)])
  sim_i2t = f32(image_feat) @ text_all.T / temp
  sim_t2i = f32(text_feat) @ image_all.T / temp
  # The momentum model's similarities are targets: no gradient (ALBEF: torch.no_grad()).
  sim_i2t_m = jax.lax.stop_gradient(f32(image_feat_m) @ text_all.T / temp)
  sim_t2i_m = jax.lax.stop_gradient(f32(text_feat_m) @ image_all.T / temp)
  onehot = jnp.eye(*sim_i2t.shape)
  i2t_targets = alpha * jax.nn.softmax(sim_i2t_m, axis=-1) + (1 - alpha) * onehot
  t2i_targets = alpha * jax.nn.softmax(sim_t2i_m, axis=-1) + (1 - alpha) * onehot
  loss = 0.5 * (_soft_cross_entropy(sim_i2t, i2t_targets) + _soft_cross_entropy(sim_t2i, t2i_targets))
  return loss, sim_i2t, sim_t2i


def itm_negative_logits(sim):
  """Sampling logits of hard negatives from in-batch similarities sim [B, B].

  As ALBEF: weights softmax(sim) + 1e-4 with the positive (diagonal) at zero,
  so every other example can be drawn, and the positive never.
  """
  weights = jax.nn.softmax(jax.lax.stop_gradient(sim.astype(jnp.float32)), axis=-1) + 1e-4
  return jnp.where(jnp.eye(sim.shape[0], dtype=bool), -jnp.inf, jnp.log(weights))


def sample_itm_negatives(key, sim_i2t, sim_t2i):
  """One hard negative per example: (image index for each text, text index for each image), [B] each.

  sim_i2t / sim_t2i are the in-batch [B, B] online similarities (ALBEF uses
  the first B columns of the ITC similarities: the momentum in-batch features).
  """
  k_image, k_text = jax.random.split(key)
  neg_image = jax.random.categorical(k_image, itm_negative_logits(sim_t2i), axis=-1)
  neg_text = jax.random.categorical(k_text, itm_negative_logits(sim_i2t), axis=-1)
  return neg_image, neg_text


def itm_loss(logits, labels):
  """Cross-entropy of the 2-way ITM head: logits [N, 2], labels [N] (1 = matching pair)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def mlm_loss(logits, labels, logits_m, alpha):
  """(1 - alpha) CE(labels) + alpha CE(softmax of the momentum logits), over masked positions.

  logits, logits_m [B, L, V]; labels [B, L] hold the original id at masked
  positions and IGNORE_INDEX elsewhere; both terms are means over the masked
  positions of the whole batch (ALBEF's BertForMaskedLM with soft_labels).
  """
  valid = labels != IGNORE_INDEX
  n = jnp.maximum(jnp.sum(valid), 1)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  hard = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  soft_targets = jax.nn.softmax(jax.lax.stop_gradient(logits_m.astype(jnp.float32)), axis=-1)
  soft = -jnp.sum(soft_targets * logp, axis=-1)
  mean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / n
  return (1 - alpha) * mean(hard) + alpha * mean(soft)
