"""Mesh, logical-axis rules, shardings and the per-device memory table.

Parameters carry logical axis names (vlp.models.layers); a rules table maps
each name to mesh axes: RULES, overridden by `config.mesh_rules`. A dimension
that its mesh axes do not divide stays replicated rather than failing.
Activations are pinned at block boundaries with `constrain`, by the same rules.
"""
import contextlib
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp.config import MESH_AXES

# logical axis -> mesh axis or axes (None: replicated). FSDP shards the model
# width of every weight (and its optimizer state); tensor parallelism splits
# MLP hidden units, attention heads, vocab and the projection; experts go over
# the expert axis.
RULES = {
    'embed': 'fsdp',
    'mlp': 'tensor',
    'heads': 'tensor',
    'vocab': 'tensor',
    'kv': None,
    'patch': None,
    'proj': 'tensor',
    'expert': 'expert',
}
BATCH_AXES = ('data', 'fsdp')  # the batch (and every activation's batch dim) is split over these


def rules_from(config) -> dict:
  return {**RULES, **{name: tuple(a) if isinstance(a, list) else a for name, a in config.mesh_rules}}


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, tensor, expert) over `devices` (default: all)."""
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _mesh_axes(axis, dim, mesh, used):
  """The mesh axes of `axis` (one, a tuple or None) that can shard a dimension of size `dim`."""
  axes = tuple(a for a in ((axis,) if isinstance(axis, str) else axis or ())
               if a not in used and mesh.shape[a] > 1)
  if not axes or dim % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes[0] if len(axes) == 1 else axes


def logical_to_mesh_spec(logical, shape, mesh, rules=None) -> P:
  """Maps logical axis names (a PartitionSpec or tuple) to mesh axes for an array of `shape`."""
  rules = RULES if rules is None else rules
  used, out = set(), []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    axis = BATCH_AXES if name == 'batch' else rules.get(name) if name is not None else None
    axes = _mesh_axes(axis, dim, mesh, used)
    out.append(axes)
    used.update((axes,) if isinstance(axes, str) else axes or ())
  return P(*out)


def tree_shardings(logical_specs, abstract_tree, mesh, rules=None):
  """NamedShardings for a tree of arrays given a matching tree of logical specs."""
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
      logical_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P))


_ACTIVATIONS = []  # (mesh, rules) while a sharded step is traced


@contextlib.contextmanager
def activation_rules(mesh, rules):
  """Within this context `constrain` pins activations; outside (eval, export) it does nothing."""
  _ACTIVATIONS.append((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATIONS.pop()


def constrain(x, names):
  """Pins an activation to the sharding its logical axis names give (e.g. ('batch', None, 'mlp'))."""
  if not _ACTIVATIONS:
    return x
  mesh, rules = _ACTIVATIONS[-1]
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_mesh_spec(names, x.shape, mesh, rules)))


def like_params_shardings(tree, param_shardings, mesh):
  """Shardings for a tree (e.g. an optax state) whose sub-trees mirror the params.

  A leaf whose key path ends with a parameter's key path and has its shape
  gets that parameter's sharding (Adam's mu/nu); anything else is replicated.
  """
  by_path = {}
  for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
    by_path[_keys(path)] = sh
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      sh = by_path.get(keys[start:])
      if sh is not None and len(sh.spec) <= len(getattr(leaf, 'shape', ())):
        return sh
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def _keys(path):
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (replicated leaves count whole)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_tree))


def _stack_bytes(t, length: int, local_batch: int, remat: str, tp: int, itemsize: int) -> float:
  """Activations one Transformer stack (width, depth, heads, mlp_dim of t) keeps for its backward pass."""
  d, mlp, h = t.width, t.mlp_dim, t.num_heads
  per_token = {'none': 8 * d + (2 * mlp + 2 * h * length) / tp,
               'dots_saveable': 6 * d + (mlp + h * length) / tp,
               'full': d}[remat]
  return local_batch * length * per_token * t.depth * itemsize


def activation_bytes_estimate(config, sizes) -> int:
  """Rough per-device bytes of the activations kept for the backward pass of one micro-batch.

  Per Transformer block and token, without remat: residual and LayerNorm
  outputs, QKV and attention output (8 x width), the MLP hidden before and
  after GELU (2 x mlp_dim), attention logits and weights (2 x heads x length);
  the head, MLP and attention parts split over `tensor`. 'dots_saveable' keeps
  the matmul outputs only, 'full' the block inputs only. Plus the contrastive
  logits (a row block of them with loss.chunk_size). IMP: the largest of its
  task variants (vision tokens after DropToken, then text or class prompts).
  """
  m = config.model
  itemsize = np.dtype(m.dtype).itemsize
  shards, tp = sizes['data'] * sizes['fsdp'], sizes['tensor']
  if m.name == 'imp':
    from vlp.train import agd  # imported here: vlp.train imports this module
    return int(max(_imp_variant_bytes(config, v, shards, tp, itemsize) for v in agd.variants(config, sizes)))
  batch = config.batch_size // config.accum_steps
  im = m.image
  towers = [(im, (im.image_size // im.patch_size) ** 2 + 1), (m.text, m.text.context_length)]
  total = sum(_stack_bytes(t, length, batch // shards, m.remat, tp, itemsize) for t, length in towers)
  rows = config.loss.chunk_size or batch
  total += 2 * rows * batch * 4  # float32 logits and their softmax
  return int(total)


def _imp_variant_bytes(config, v, shards, tp, itemsize) -> float:
  from vlp.train import agd
  m, t = config.model, v.cfg
  batch = v.batch_size // v.accum_steps
  vision = max(1, round(agd.vision_tokens(config, t, v.image_size) * (1 - t.drop_token)))
  total = _stack_bytes(m.encoder, vision, batch // shards, m.remat, tp, itemsize)
  if t.loss == 'contrastive':
    total += _stack_bytes(m.encoder, m.text.context_length, batch // shards, m.remat, tp, itemsize)
    total += 2 * batch * batch * 4
  else:  # every class prompt, on every device
    from vlp.models.imp import class_names
    prompts = len(class_names(t.data)) * len(t.templates)
    total += _stack_bytes(m.encoder, m.text.context_length, prompts, m.remat, tp, itemsize)
  return total


def memory_table(abstract_state, config, sizes) -> dict:
  """Per-device bytes: params, optimizer state (from their shardings) and an activation estimate."""
  table = {'params': bytes_per_device(abstract_state['params']),
           'opt_state': bytes_per_device(abstract_state['opt_state'])}
  extra = {k: v for k, v in abstract_state.items() if k not in ('step', 'params', 'opt_state')}
  if extra:  # the model's own state (ALBEF: momentum params, feature queues)
    table['model state'] = bytes_per_device(extra)
  # ALIGN's estimate: ALBEF's fusion passes (3B ITM pairs, MLM) are not in it
  table['activations (est.)'] = activation_bytes_estimate(config, sizes)
  return table


def format_memory_table(table: dict, sizes: dict) -> str:
  mesh = ' '.join(f'{a}={n}' for a, n in sizes.items())
  lines = [f'per-device memory (mesh {mesh}):']
  lines += [f'  {k:<20} {v / 2**20:10.2f} MiB' for k, v in table.items()]
  lines.append(f'  {"total":<20} {sum(table.values()) / 2**20:10.2f} MiB')
  return '\n'.join(lines)
