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

from vlp.core.config import ConfigError, MESH_AXES

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
    'layers': None,  # the leading axis of a scanned stack's stored params (vlp.models.stacks)
}
BATCH_AXES = ('data', 'fsdp')  # the batch (and every activation's batch dim) is split over these


def rules_from(config) -> dict:
  return {**RULES, **{name: tuple(a) if isinstance(a, list) else a for name, a in config.mesh_rules}}


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, tensor, expert) over `devices` (default: all); refuses one
  whose processes would share batch rows (see shared_batch_rows)."""
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)
  shared = shared_batch_rows(mesh.devices, mesh.axis_names)
  if shared:
    block, procs = shared[0]
    spans = ' x '.join(f'{a}={mesh.shape[a]}' for a in mesh.axis_names if a not in BATCH_AXES and mesh.shape[a] > 1)
    raise ConfigError(f"config key 'mesh': processes {procs} would hold the same batch rows (block {block} of "
                      f"data x fsdp = {math.prod(mesh.shape[a] for a in BATCH_AXES)}, {len(shared)} such blocks): "
                      f'{spans} spans processes; the batch is split over data x fsdp only')
  return mesh


def shared_batch_rows(devices: np.ndarray, axis_names) -> list[tuple[int, list[int]]]:
  """(batch block, its processes) for every block of batch rows (one per data x fsdp
  coordinate) that devices of more than one process hold: a tensor or expert group that
  spans processes. Each process feeds its own rows (jax.make_array_from_process_local_data),
  so such a mesh would give hosts the same rows and a wrong global batch."""
  batch = [axis_names.index(a) for a in BATCH_AXES]
  rest = [i for i in range(len(axis_names)) if i not in batch]
  blocks = np.transpose(devices, batch + rest).reshape(math.prod(devices.shape[i] for i in batch), -1)
  out = []
  for block, group in enumerate(blocks):
    procs = sorted({d.process_index for d in group})
    if len(procs) > 1:
      out.append((block, procs))
  return out


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


def active_mesh():
  """The mesh of the sharded step being traced (see activation_rules), or None."""
  return _ACTIVATIONS[-1][0] if _ACTIVATIONS else None


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


def stack_activation_bytes(t, length: int, local_batch: int, remat: str, tp: int, itemsize: int) -> float:
  """Activations one Transformer stack (width, depth, num_heads, mlp_dim of t) keeps for its
  backward pass, per device.

  Per block and token, without remat: residual and LayerNorm outputs, QKV and
  attention output (8 x width), the MLP hidden before and after GELU
  (2 x mlp_dim), attention logits and weights (2 x heads x length); the head,
  MLP and attention parts split over `tensor`. 'dots_saveable' keeps the
  matmul outputs only, 'full' the block inputs only.
  """
  d, mlp, h = t.width, t.mlp_dim, t.num_heads
  per_token = {'none': 8 * d + (2 * mlp + 2 * h * length) / tp,
               'dots_saveable': 6 * d + (mlp + h * length) / tp,
               'full': d}[remat]
  return local_batch * length * per_token * t.depth * itemsize


def memory_table(abstract_state, activation_bytes: float | None = None) -> dict:
  """Per-device bytes of every part of the state (from their shardings) and, when the
  recipe has one, its activation estimate (the largest of the plan's variants)."""
  table = {k: bytes_per_device(v) for k, v in abstract_state.items() if k != 'step'}
  if activation_bytes is not None:
    table['activations (est.)'] = int(activation_bytes)
  return table


def format_memory_table(table: dict, sizes: dict) -> str:
  mesh = ' '.join(f'{a}={n}' for a, n in sizes.items())
  lines = [f'per-device memory (mesh {mesh}):']
  lines += [f'  {k:<20} {v / 2**20:10.2f} MiB' for k, v in table.items()]
  lines.append(f'  {"total":<20} {sum(table.values()) / 2**20:10.2f} MiB')
  if 'activations (est.)' in table:  # how far off it is, per TPU topology: `vlp compile`
    lines += ["  an estimate: the state rows are the arrays' bytes (a TPU pads dimensions under 128), the",
              "  activation row leaves out gradients and the update's temporaries; `vlp compile` compares it",
              '  with the compiled step']
  return '\n'.join(lines)
