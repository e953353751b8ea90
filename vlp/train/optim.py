"""Optax optimiser from config: warm-up + decay schedule, clipping, weight-decay mask, and for
LiT and fine-tuning frozen params and per-group learning rates (optim.frozen, optim.lr_mult).

Params are named by their '/'-joined path ('image/encoder/blocks/0/attn/qkv'); patterns are
regular expressions matched against the whole name (re.fullmatch), as big_vision's
`schedule` and `frozen` patterns."""
import re

import jax
import optax

from vlp.core import trees
from vlp.models import stacks


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
      # a scanned stack's param has a leading axis over its blocks (vlp.models.stacks): a block's is one less
      ndim = x.ndim - any(stacks.run_range(getattr(k, 'key', None)) for k in path)
      return ndim >= 2 and name not in no_decay and not name.endswith('bias')
    return jax.tree_util.tree_map_with_path(keep, params)
  return mask


def frozen_mask(o, params):
  """True for the params optim.frozen names (they get no update and hold no optimizer state)."""
  patterns = [re.compile(p) for p in o.get('frozen', ())]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(p.fullmatch(trees.path_name(path)) for p in patterns), params)


def group_labels(o, params):
  """Each param's group: 'frozen', 'lr_mult_I' (the first optim.lr_mult pattern it matches) or 'base'."""
  frozen = [re.compile(p) for p in o.get('frozen', ())]
  mults = [re.compile(p) for p, _ in o.get('lr_mult', ())]

  def label(path, _):
    name = trees.path_name(path)
    if any(p.fullmatch(name) for p in frozen):
      return 'frozen'
    return next((f'lr_mult_{i}' for i, p in enumerate(mults) if p.fullmatch(name)), 'base')
  return jax.tree_util.tree_map_with_path(label, params)


def _base(o, lr):
  mask = decay_mask(tuple(o.no_decay))
  if o.name == 'adamw':
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  return optax.lamb(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)


def make(o, total_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  lr = schedule(o, total_steps)
  if o.get('frozen') or o.get('lr_mult'):
    # one optimizer per group: frozen params get none (no Adam moments: the memory LiT saves),
    # a group's learning rate is the schedule times its multiplier
    groups = {'base': _base(o, lr), 'frozen': optax.set_to_zero()}
    for i, (_, mult) in enumerate(o.get('lr_mult', ())):
      groups[f'lr_mult_{i}'] = _base(o, lambda step, m=float(mult): m * lr(step))
    opt = optax.multi_transform(groups, lambda params: group_labels(o, params))
  else:
    opt = _base(o, lr)
  if o.clip_norm:  # frozen params' gradients are zero (the step stops them), so outside the norm
    opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
  return opt, lr
