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


def _row_blocks(image_emb, text_emb, chunk_size):
  """[B, D] x2 -> [B/c, c, D] x2 in float32 (image rows and their matching text rows)."""
  n, d = image_emb.shape
  if n % chunk_size:
    raise ValueError(f'batch {n} is not divisible by chunk_size {chunk_size}')
  blocks = lambda x: x.astype(jnp.float32).reshape(n // chunk_size, chunk_size, d)
  return blocks(image_emb), blocks(text_emb)


def chunked_softmax_contrastive(image_emb, text_emb, logit_scale, label_smoothing=0.0, chunk_size=256):
  """softmax_contrastive over row blocks: only a [chunk_size, B] block of logits exists at a time.

  With targets t = (1-e) onehot + e/B, a row's cross-entropy is
  -(1-e) l_ii - e/B sum_j l_ij + lse_j(l_ij): the image->text part is summed
  block by block, and the text->image part (columns) from a running column
  logsumexp and column sum. Each block is rematerialised in the backward pass,
  so the gradient needs no more memory than the forward.
  """
  xb, yb = _row_blocks(image_emb, text_emb, chunk_size)
  y = text_emb.astype(jnp.float32)
  n, e = y.shape[0], label_smoothing

  @jax.checkpoint
  def block(carry, xy):
    rows_ce, diag, col_lse, col_sum = carry
    x_blk, y_blk = xy
    logits = logit_scale * x_blk @ y.T  # [c, B]
    d = logit_scale * jnp.sum(x_blk * y_blk, axis=-1)  # the matching pairs l_ii of these rows
    rows = jax.nn.logsumexp(logits, axis=1) - (1 - e) * d - e / n * jnp.sum(logits, axis=1)
    return (rows_ce + jnp.sum(rows), diag + jnp.sum(d),
            jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0)), col_sum + jnp.sum(logits, axis=0)), None

  init = (jnp.zeros(()), jnp.zeros(()), jnp.full((n,), -jnp.inf), jnp.zeros((n,)))
  (rows_ce, diag, col_lse, col_sum), _ = jax.lax.scan(block, init, (xb, yb))
  cols_ce = jnp.sum(col_lse) - (1 - e) * diag - e / n * jnp.sum(col_sum)
  return 0.5 * (rows_ce + cols_ce) / n


def chunked_sigmoid_contrastive(image_emb, text_emb, logit_scale, logit_bias, chunk_size=256):
  """sigmoid_contrastive over row blocks of [chunk_size, B] logits: every pair as a negative,
  then the diagonal corrected to a positive (log sig(l) - log sig(-l))."""
  xb, yb = _row_blocks(image_emb, text_emb, chunk_size)
  y = text_emb.astype(jnp.float32)

  @jax.checkpoint
  def block(total, xy):
    x_blk, y_blk = xy
    logits = logit_scale * x_blk @ y.T + logit_bias
    d = logit_scale * jnp.sum(x_blk * y_blk, axis=-1) + logit_bias
    return total + jnp.sum(jax.nn.log_sigmoid(-logits)) + jnp.sum(jax.nn.log_sigmoid(d) - jax.nn.log_sigmoid(-d)), None

  total, _ = jax.lax.scan(block, jnp.zeros(()), (xb, yb))
  return -total / y.shape[0]
