"""Contrastive losses of dual encoders, in O(rows x B) memory per device.

All take L2-normalised embeddings [B, D] and compute over the whole (global)
batch. No [B, B] target matrix is built: the softmax loss is, per row,
logsumexp - (1 - e) x diagonal - e x row mean (label smoothing e), the
sigmoid loss flips the sign of a logit where its row and column index meet.

While a sharded step is traced (`parallel.activation_rules`, or an explicit
`mesh`), every loss runs per device on the device's own rows, in `shard_map`
over the mesh's batch axes:
- the softmax and sigmoid losses gather the text rows (B x D) and compute a
  [rows, B] block of logits (in blocks of `chunk_size` rows with the chunked
  variants); the softmax's column logsumexps are combined across devices;
- `ring_sigmoid_contrastive` / `ring_softmax_contrastive` keep each device's
  image rows while the text blocks travel a ring of the devices (`ppermute`),
  as in the SigLIP paper: [rows, rows] logits at a time, no gathered text, and
  a custom VJP that runs the ring again backwards instead of keeping blocks.
Without a mesh they compute over the whole batch on one device. `temp_bytes`
is what their value and gradient allocate per device (the memory table's term).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlp.core import parallel

IMPLS = ('gather', 'ring')  # config.loss.impl: how the batch devices share the logits


def _batch_axes(mesh, n: int):
  """(mesh, batch axes of size > 1, shard count) while the batch is split; (None, (), 1) otherwise."""
  mesh = mesh if mesh is not None else parallel.active_mesh()
  axes = tuple(a for a in parallel.BATCH_AXES if mesh is not None and mesh.shape[a] > 1)
  shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if n % shards:
    raise ValueError(f'batch {n} does not split over the {shards} batch devices')
  return mesh, axes, shards


def _per_shard(local, mesh, image_emb, text_emb, *scalars):
  """local(x, y, *scalars, axes, shards) -> loss, on every device's rows of the batch (or the whole)."""
  mesh, axes, shards = _batch_axes(mesh, image_emb.shape[0])
  x, y = image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)
  scalars = tuple(jnp.asarray(s, jnp.float32) for s in scalars)
  local = functools.partial(local, axes=axes, shards=shards)
  if not axes:
    return local(x, y, *scalars)
  rows = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows) + (P(),) * len(scalars), out_specs=P())(
      x, y, *scalars)


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _zeros(shape, axes, fill=0.0):
  """A float32 carry that, like the per-device values added to it, varies over the batch axes."""
  z = jnp.full(shape, fill, jnp.float32)
  return jax.lax.pcast(z, axes, to='varying') if axes else z


def _first_row(axes, rows: int):
  """The global index of this device's first row."""
  return jax.lax.axis_index(axes) * rows if axes else 0


def _blocks(x, chunk: int):
  """[r, D] -> [r/c, c, D] (c = chunk, or r when 0 or larger)."""
  r = x.shape[0]
  c = min(chunk, r) if chunk else r
  if r % c:
    raise ValueError(f'{r} rows per device are not divisible by chunk_size {chunk}')
  return x.reshape(r // c, c, x.shape[1])


def _scan_blocks(block, init, xs, n_blocks: int):
  """Folds `block` over row blocks; one block runs as is, several in a scan rematerialised
  in the backward pass (only one block's logits exist at a time)."""
  if n_blocks == 1:
    return block(init, jax.tree.map(lambda a: a[0], xs))[0]
  return jax.lax.scan(jax.checkpoint(block), init, xs)[0]


def _softmax_local(x, y, scale, *, eps, chunk, axes, shards):
  """Softmax loss of this device's rows x, y against the gathered text of the batch."""
  y_all = jax.lax.all_gather(y, axes, tiled=True) if axes else y
  n = y_all.shape[0]
  xb, yb = _blocks(x, chunk), _blocks(y, chunk)

  def block(carry, xy):
    rows_ce, diag, total, col_lse = carry
    x_blk, y_blk = xy
    logits = scale * x_blk @ y_all.T  # [c, B]
    d = scale * jnp.sum(x_blk * y_blk, axis=-1)  # the matching pairs l_ii of these rows
    rows = jax.nn.logsumexp(logits, axis=1) - (1 - eps) * d
    return (rows_ce + jnp.sum(rows), diag + jnp.sum(d), total + jnp.sum(logits),
            jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))), None

  zero = _zeros((), axes)
  init = (zero, zero, zero, _zeros((n,), axes, -jnp.inf))
  rows_ce, diag, total, col_lse = _scan_blocks(block, init, (xb, yb), xb.shape[0])
  if axes:  # the columns' logsumexp over every device's rows
    top = jax.lax.pmax(jax.lax.stop_gradient(col_lse), axes)
    col_lse = top + jnp.log(jax.lax.psum(jnp.exp(col_lse - top), axes))
  # sum_i [lse_i - (1-e) l_ii - e/B sum_j l_ij], and the same over the columns
  local = rows_ce - (1 - eps) * diag - 2 * eps / n * total
  return 0.5 * (_psum(local, axes) + jnp.sum(col_lse)) / n


def _sigmoid_block(x, y_cols, scale, bias, row0, col0):
  """sum_ij log sigmoid(z_ij l_ij) of a block of logits whose first row and column are
  global indices row0, col0 (z = +1 where they meet, -1 elsewhere)."""
  logits = scale * x @ y_cols.T + bias
  pos = (row0 + jnp.arange(x.shape[0]))[:, None] == (col0 + jnp.arange(y_cols.shape[0]))[None, :]
  return jnp.sum(jax.nn.log_sigmoid(jnp.where(pos, logits, -logits)))


def _sigmoid_local(x, y, scale, bias, *, chunk, axes, shards):
  """Sigmoid loss of this device's rows x against the gathered text of the batch."""
  y_all = jax.lax.all_gather(y, axes, tiled=True) if axes else y
  xb = _blocks(x, chunk)
  first = _first_row(axes, x.shape[0]) + xb.shape[1] * jnp.arange(xb.shape[0])

  def block(total, xr):
    x_blk, row0 = xr
    return total + _sigmoid_block(x_blk, y_all, scale, bias, row0, 0), None

  total = _scan_blocks(block, _zeros((), axes), (xb, first), xb.shape[0])
  return -_psum(total, axes) / y_all.shape[0]


# The ring (SigLIP paper, sec. 3.3): device i keeps its image rows x_i; the text blocks
# y_j pass round the devices, i sending to i + 1, so at step k device i holds the block
# of device i - k. A custom VJP runs the ring again in the backward pass, each block
# carrying its gradient round and sent home at the end, so neither pass keeps more than
# one [rows, rows] block of logits and the blocks it holds.


def _ring_fold(axes, shards: int, fn, carry, moving):
  """carry, moving = fn(k, carry, moving) for k = 0 .. shards - 1, `moving` (blocks and what
  travels with them) passed on to the next device between steps."""
  carry, moving = fn(0, carry, moving)
  if shards == 1:
    return carry, moving

  def step(state, k):
    return fn(k, *_pass_on(state, axes, shards, 1)), None

  return jax.lax.scan(step, (carry, moving), jnp.arange(1, shards))[0]


def _pass_on(state, axes, shards: int, which: int):
  """state[which] sent from every device i to i + 1."""
  ring = [(i, (i + 1) % shards) for i in range(shards)]
  return tuple(jax.lax.ppermute(s, axes, ring) if j == which else s for j, s in enumerate(state))


def _ring_signs(r: int, k):
  """z of the block held at step k: +1 on the diagonal of the device's own block, -1 elsewhere."""
  own = (jnp.arange(r)[:, None] == jnp.arange(r)[None, :]) & (k == 0)
  return jnp.where(own, 1.0, -1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_sigmoid_sum(axes, shards, x, y, scale, bias):
  """sum over this device's rows and every column of log sigmoid(z (scale x.y + bias))."""
  def fn(k, total, y_blk):
    z = _ring_signs(x.shape[0], k)
    return total + jnp.sum(jax.nn.log_sigmoid(z * (scale * x @ y_blk.T + bias))), y_blk

  return _ring_fold(axes, shards, fn, _zeros((), axes), y)[0]


def _ring_sigmoid_fwd(axes, shards, x, y, scale, bias):
  return _ring_sigmoid_sum(axes, shards, x, y, scale, bias), (x, y, scale, bias)


def _ring_sigmoid_bwd(axes, shards, res, g):
  x, y, scale, bias = res

  def fn(k, grads, moving):
    dx, ds, db = grads
    y_blk, dy_blk = moving
    dots = x @ y_blk.T
    z = _ring_signs(x.shape[0], k)
    dl = g * z * jax.nn.sigmoid(-z * (scale * dots + bias))  # d log sigmoid(z l) / dl
    return (dx + scale * dl @ y_blk, ds + jnp.sum(dl * dots), db + jnp.sum(dl)), (y_blk, dy_blk + scale * dl.T @ x)

  init = (jnp.zeros_like(x), _zeros((), axes), _zeros((), axes)), (y, jnp.zeros_like(y))
  (dx, ds, db), (_, dy) = _ring_fold(axes, shards, fn, *init)
  if shards > 1:  # the block held last is the next device's: its gradient goes home
    dy = _pass_on((dy,), axes, shards, 0)[0]
  return dx, dy, ds, db


_ring_sigmoid_sum.defvjp(_ring_sigmoid_fwd, _ring_sigmoid_bwd)


def _ring_sigmoid_local(x, y, scale, bias, *, axes, shards):
  scale, bias = (jax.lax.pcast(v, axes, to='varying') if axes else v for v in (scale, bias))
  return -_psum(_ring_sigmoid_sum(axes, shards, x, y, scale, bias), axes) / (x.shape[0] * shards)


def _ring_lse_parts(axes, shards, x, y, scale):
  """(row logsumexps of this device's rows, column logsumexps of its own text block)."""
  r = x.shape[0]

  def fn(k, row_lse, moving):
    y_blk, col_lse = moving
    logits = scale * x @ y_blk.T
    return (jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1)),
            (y_blk, jnp.logaddexp(col_lse, jax.nn.logsumexp(logits, axis=0))))

  row_lse, (_, col_lse) = _ring_fold(axes, shards, fn, _zeros((r,), axes, -jnp.inf),
                                     (y, _zeros((r,), axes, -jnp.inf)))
  if shards > 1:  # complete on the device before the block's own: sent home
    col_lse = _pass_on((col_lse,), axes, shards, 0)[0]
  return row_lse, col_lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_lse_sum(axes, shards, x, y, scale):
  """sum of the row logsumexps of this device's rows and the column ones of its text block."""
  row_lse, col_lse = _ring_lse_parts(axes, shards, x, y, scale)
  return jnp.sum(row_lse) + jnp.sum(col_lse)


def _ring_lse_fwd(axes, shards, x, y, scale):
  row_lse, col_lse = _ring_lse_parts(axes, shards, x, y, scale)
  return jnp.sum(row_lse) + jnp.sum(col_lse), (x, y, scale, row_lse, col_lse)


def _ring_lse_bwd(axes, shards, res, g):
  x, y, scale, row_lse, col_lse = res

  def fn(k, grads, moving):
    dx, ds = grads
    y_blk, col_blk, dy_blk = moving
    dots = x @ y_blk.T
    logits = scale * dots
    dl = g * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - col_blk[None, :]))  # both softmaxes
    return (dx + scale * dl @ y_blk, ds + jnp.sum(dl * dots)), (y_blk, col_blk, dy_blk + scale * dl.T @ x)

  init = (jnp.zeros_like(x), _zeros((), axes)), (y, col_lse, jnp.zeros_like(y))
  (dx, ds), (_, _, dy) = _ring_fold(axes, shards, fn, *init)
  if shards > 1:
    dy = _pass_on((dy,), axes, shards, 0)[0]
  return dx, dy, ds


_ring_lse_sum.defvjp(_ring_lse_fwd, _ring_lse_bwd)


def _ring_softmax_local(x, y, scale, *, eps, axes, shards):
  """Softmax loss of this device's rows: the logsumexps on the ring; the diagonal and the sum
  of all logits (scale x (sum_i x_i).(sum_j y_j)) need no ring."""
  n = x.shape[0] * shards
  scale_v = jax.lax.pcast(scale, axes, to='varying') if axes else scale
  local = _ring_lse_sum(axes, shards, x, y, scale_v) - 2 * (1 - eps) * scale * jnp.sum(x * y)
  total = scale * jnp.dot(_psum(jnp.sum(x, axis=0), axes), _psum(jnp.sum(y, axis=0), axes))
  return 0.5 * (_psum(local, axes) - 2 * eps / n * total) / n


def softmax_contrastive(image_emb, text_emb, logit_scale, label_smoothing=0.0, *, mesh=None):
  """ALIGN/CLIP: mean of the image->text and text->image cross-entropies.

  `logit_scale` multiplies the cosine similarities (1/temperature, already
  exponentiated). With label smoothing e, the target row is (1-e)*onehot + e/B.
  """
  return chunked_softmax_contrastive(image_emb, text_emb, logit_scale, label_smoothing, chunk_size=0, mesh=mesh)


def sigmoid_contrastive(image_emb, text_emb, logit_scale, logit_bias, *, mesh=None):
  """SigLIP: -sum_ij log sigmoid(z_ij (scale x_i.y_j + bias)) / B, z = +1 on the diagonal, -1 elsewhere."""
  return chunked_sigmoid_contrastive(image_emb, text_emb, logit_scale, logit_bias, chunk_size=0, mesh=mesh)


def chunked_softmax_contrastive(image_emb, text_emb, logit_scale, label_smoothing=0.0, chunk_size=256, *,
                                mesh=None):
  """softmax_contrastive over blocks of each device's rows: a [chunk_size, B] block of logits
  at a time, rematerialised in the backward pass (0: all its rows at once).

  A row's cross-entropy is lse_j(l_ij) - (1-e) l_ii - e/B sum_j l_ij: the
  image->text part is summed block by block, the text->image part (columns)
  from a running column logsumexp, combined across devices.
  """
  local = functools.partial(_softmax_local, eps=float(label_smoothing), chunk=chunk_size)
  return _per_shard(local, mesh, image_emb, text_emb, logit_scale)


def chunked_sigmoid_contrastive(image_emb, text_emb, logit_scale, logit_bias, chunk_size=256, *, mesh=None):
  """sigmoid_contrastive over blocks of each device's rows: [chunk_size, B] logits at a time."""
  local = functools.partial(_sigmoid_local, chunk=chunk_size)
  return _per_shard(local, mesh, image_emb, text_emb, logit_scale, logit_bias)


def ring_sigmoid_contrastive(image_emb, text_emb, logit_scale, logit_bias, *, mesh=None):
  """sigmoid_contrastive with the text blocks travelling a ring of the batch devices:
  [rows, rows] logits per device at a time, (devices - 1) ppermutes of a [rows, D] block."""
  return _per_shard(_ring_sigmoid_local, mesh, image_emb, text_emb, logit_scale, logit_bias)


def ring_softmax_contrastive(image_emb, text_emb, logit_scale, label_smoothing=0.0, *, mesh=None):
  """softmax_contrastive on the ring of ring_sigmoid_contrastive; each text block carries
  its columns' running logsumexp round with it."""
  local = functools.partial(_ring_softmax_local, eps=float(label_smoothing))
  return _per_shard(local, mesh, image_emb, text_emb, logit_scale)


def temp_bytes(head: str, impl: str, batch: int, shards: int, embed_dim: int, chunk_size: int = 0) -> int:
  """Per-device bytes of the temporaries of the loss's value and gradient (float32), as XLA
  allocates them (fitted to `memory_analysis()` of the compiled loss and gradient on 8 CPU
  devices, B = 1k-8k, D = 128-768: within 10%; tests/test_parallel.py compares them).

  With r = batch / shards rows per device: 'gather' holds the gathered text and its
  gradient (B x D each) and [r, B] logits with their gradient, or with chunk_size c
  a [c, B] block; 'ring' holds [r, r] blocks and [r, D] travelling text.
  """
  r, b, d = batch // shards, batch, embed_dim
  c = min(chunk_size, r) if chunk_size else r
  if impl == 'ring':
    elements = 4 * r * r + 3 * r * d + d * d // 2 if head == 'sigmoid' else 3 * r * r + 2 * r * d + d * d // 8
  elif c == r:
    elements = 2 * r * b + b * d
  elif head == 'sigmoid':
    elements = 4 * b * d + c * b + 2 * c * d
  else:
    elements = 3 * b * d + c * b + r * d + 3 * c * d
  return 4 * elements
