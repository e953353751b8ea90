"""Mesh, logical-axis rules and shardings.

Parameters carry logical axis names (vlp.models.layers); RULES maps each name
to a mesh axis. A dimension that the mesh axis does not divide stays
replicated rather than failing, and is reported by `describe`.
"""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp.config import MESH_AXES

# logical axis -> mesh axis (None: replicated). FSDP shards the model width of
# every weight; tensor parallelism splits MLP hidden units, heads and vocab.
RULES = {
    'embed': 'fsdp',
    'mlp': 'tensor',
    'heads': 'tensor',
    'vocab': 'tensor',
    'kv': None,
    'patch': None,
    'proj': 'tensor',
}
BATCH_AXES = ('data', 'fsdp')


def make_mesh(sizes: dict[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, tensor) over `devices` (default: all)."""
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_mesh_spec(logical: P, shape, mesh) -> P:
  """Maps a logical PartitionSpec to mesh axes for an array of `shape`."""
  used, out = set(), []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
    axis = RULES.get(name) if name is not None else None
    if axis is None or axis in used or dim % mesh.shape[axis] != 0 or mesh.shape[axis] == 1:
      out.append(None)
    else:
      out.append(axis)
      used.add(axis)
  return P(*out)


def tree_shardings(logical_specs, abstract_tree, mesh):
  """NamedShardings for a tree of arrays given a matching tree of logical specs."""
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh)),
      logical_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P))


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

