"""Names of the leaves of nested dicts of arrays (params, optimizer state): flat dotted names and
back, the names of weight files, exports and imports ('image.blocks.0.attn.qkv.kernel'); and
'/'-joined paths, the names config patterns match (optim.frozen: 'image/blocks/0/attn/qkv')."""


def flatten(tree: dict, prefix: str = ''):
  """Yields (dotted key, leaf) of a nested dict: 'a.b.0.c'."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from flatten(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def unflatten(flat: dict) -> dict:
  """The nested dict of flatten's (dotted key, leaf) pairs; digit keys become ints (list indices)."""
  tree = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[int(leaf) if leaf.isdigit() else leaf] = v
  return tree


def path_name(path) -> str:
  """The '/'-joined name of a jax tree path: 'image/blocks/0/attn/qkv/kernel'."""
  return '/'.join(str(getattr(p, 'key', p)) for p in path)
