"""Optax optimiser from config: warm-up + decay schedule, clipping, weight-decay mask."""
import jax
import optax


def schedule(o, total_steps: int):
  warmup = min(o.warmup_steps, total_steps)
  end = o.lr * o.end_lr_frac
  decay_steps = max(total_steps - warmup, 1)
  if o.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.end_lr_frac)
  elif o.schedule == 'linear':
    decay = optax.linear_schedule(o.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(o.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), decay], [warmup])


def decay_mask(no_decay=('pos_embed',)):
  """Weight decay on matrices only: not on biases, LayerNorm, the CLS token, the
  temperature/bias of the contrastive head, or params named in `no_decay`
  (config optim.no_decay, e.g. position or token embeddings)."""
  def mask(params):
    def keep(path, x):
      name = str(getattr(path[-1], 'key', path[-1]))
      return x.ndim >= 2 and name not in no_decay and not name.endswith('bias')
    return jax.tree_util.tree_map_with_path(keep, params)
  return mask


def make(o, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  lr = schedule(o, total_steps)
  mask = decay_mask(tuple(o.no_decay))
  if o.name == 'adamw':
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  else:
    opt = optax.lamb(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  if o.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
  return opt, lr
