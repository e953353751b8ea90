"""Contrastive losses of dual encoders.

Both take L2-normalised embeddings and compute over the whole (global) batch;
under `jax.jit` with a sharded batch, XLA gathers what the similarity matrix needs.
"""
import jax
import jax.numpy as jnp


def softmax_contrastive(image_emb, text_emb, logit_scale, label_smoothing=0.0):
  """ALIGN/CLIP: mean of the image->text and text->image cross-entropies.

  `logit_scale` multiplies the cosine similarities (1/temperature, already
  exponentiated). With label smoothing e, the target row is (1-e)*onehot + e/B.
  """
  logits = logit_scale * jnp.einsum('id,td->it', image_emb.astype(jnp.float32), text_emb.astype(jnp.float32))
  n = logits.shape[0]
  targets = (1.0 - label_smoothing) * jnp.eye(n) + label_smoothing / n

  def cross_entropy(lg):
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(lg, axis=-1), axis=-1))

  return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


def sigmoid_contrastive(image_emb, text_emb, logit_scale, logit_bias):
  """SigLIP: -sum_ij log sigmoid(z_ij (scale x_i.y_j + bias)) / B, z = +1 on the diagonal, -1 elsewhere."""
  logits = logit_scale * jnp.einsum('id,td->it', image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)) + logit_bias
  n = logits.shape[0]
  z = 2.0 * jnp.eye(n) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n
