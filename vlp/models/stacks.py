"""How the params of a scanned block stack are stored and named, and the per-block names of exports.

With `model.scan_layers` each run of like blocks (vlp.models.layers.block_stack) is stored as one
block whose params have a leading axis over the run, under the key 'first-last': blocks 0 to 11
of a tower are 'image/encoder/blocks/0-11/attn/qkv' [12, ...] (MaxText's param_scan_axis=0).
Unscanned, block i's params are under 'i' ('image/encoder/blocks/3/attn/qkv'). Exports, imports
and init.from name params per block; checkpoints of either layout restore into either
(vlp.checkpoint). Everything here maps between the layouts by names and keys alone: a name holds at most
one run key, and the run key says which blocks it stacks.
"""
import re

import jax
import jax.numpy as jnp

LAYERS = 'layers'  # the logical axis of a stacked param's leading axis: replicated (vlp.core.parallel.RULES)
_RUN = re.compile(r'(\d+)-(\d+)')


def run_key(first: int, last: int) -> str:
  """The key of blocks first..last stored stacked."""
  return f'{first}-{last}'


def run_range(key) -> tuple[int, int] | None:
  """(first, last) of a run key, None for any other key."""
  m = _RUN.fullmatch(str(key))
  return (int(m[1]), int(m[2])) if m else None


def is_block_key(key) -> bool:
  """A key of a block container: a block's index or a run key."""
  return isinstance(key, int) or str(key).isdigit() or run_range(key) is not None


def per_block_names(name: str) -> list[str]:
  """The per-block names a '/'-joined name stands for: one per block of its run, or itself."""
  parts = name.split('/')
  for i, part in enumerate(parts):
    r = run_range(part)
    if r:
      return ['/'.join(parts[:i] + [str(k)] + parts[i + 1:]) for k in range(r[0], r[1] + 1)]
  return [name]


def per_block(flat: dict) -> dict:
  """{name: array} with every stacked leaf split into its blocks' leaves, named per block
  (names '/'- or '.'-joined, as given)."""
  out = {}
  for name, x in flat.items():
    sep = '.' if '/' not in name else '/'
    names = per_block_names(name.replace(sep, '/'))
    if len(names) == 1:
      out[name] = x
    else:
      out.update({n.replace('/', sep): x[i] for i, n in enumerate(names)})
  return out


def _name(key) -> str:
  return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))


def _is_container(x) -> bool:
  return isinstance(x, dict) and bool(x) and all(is_block_key(k) for k in x)


def container_keys(tree) -> dict:
  """{path (tuple of names): [keys]} of every block container in a tree (params, optimizer
  state, a checkpoint's tree metadata): a dict keyed by block indices and run keys."""
  out = {}

  def visit(path, x):
    if _is_container(x):
      out[tuple(_name(k) for k in path)] = list(x)
  jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_container)
  return out


def relayout(tree, keys: dict, unstack, stack):
  """`tree` with each block container whose path is in `keys` ({path: [keys]}, as
  container_keys gives) and holds other keys rebuilt with those keys: a run key's value stacks
  its blocks' subtrees (stack(list of leaves)), a block index's value is that block's subtree,
  sliced out of a run where the tree stores it stacked (unstack(leaf, i)). Whatever else is
  in the tree (optimizer containers, other params) stays as it is."""
  def rebuild(path, x):
    want = keys.get(tuple(_name(k) for k in path)) if _is_container(x) else None
    if want is None or sorted(map(str, want)) == sorted(map(str, x)):
      return x
    blocks = {}  # block index -> its subtree
    for k, sub in x.items():
      run = run_range(k)
      if run is None:
        blocks[int(k)] = sub
        continue
      for i in range(run[0], run[1] + 1):
        blocks[i] = jax.tree.map(lambda a, j=i - run[0]: unstack(a, j), sub)
    out = {}
    for k in want:
      run = run_range(k)
      parts = [blocks[i] for i in range(run[0], run[1] + 1)] if run else None
      out[k] = jax.tree.map(lambda *leaves: stack(list(leaves)), *parts) if run else blocks[int(k)]
    return out
  return jax.tree_util.tree_map_with_path(rebuild, tree, is_leaf=_is_container)


def to_layout(tree, abstract):
  """A tree of arrays (a state, params) in the block layout and shardings of `abstract`, a tree
  of sharded ShapeDtypeStructs: its block containers rebuilt with abstract's keys (relayout)."""
  keys = container_keys(abstract)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  convert = lambda t: relayout(t, keys, lambda a, i: a[i], jnp.stack)
  return jax.jit(convert, out_shardings=shardings)(tree)
