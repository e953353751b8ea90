"""Running an eval encoder over a whole eval set on every device of the params' mesh.

big_vision's way: every host feeds only its own rows of each global batch
(host p takes rows p, p + P, p + 2P, ... of the set), all hosts run the same
number of batches (the last ones padded, the padding masked out by row ids
of -1), and the outputs come back replicated, so every host ends with the
whole set's embeddings in the set's order, whatever the mesh: a `tensor`
axis that spans hosts included (unreplicated, those outputs would be
`P(None, 'tensor')`, which no host can read whole). Images go to the device
as uint8 and are normalised by the models' embedders.

Without a mesh (params on one device, or numpy) it is one jitted call per
padded batch, the same compiled shape every time.
"""
import math

import jax
import numpy as np
from jax.sharding import NamedSharding

from vlp.core import parallel


def mesh_of(params):
  """The mesh params are sharded over, or None (one device, numpy)."""
  leaves = jax.tree.leaves(params)
  sharding = getattr(leaves[0], 'sharding', None) if leaves else None
  return sharding.mesh if isinstance(sharding, NamedSharding) else None


class Replicated:
  """jax.jit(fn), fn(params, *inputs), whose outputs come back replicated over the mesh of its
  params: readable whole on every host. Compiled once per mesh and input shape."""

  def __init__(self, fn):
    self.fn, self.jitted = fn, {}

  def __call__(self, params, *inputs):
    mesh = mesh_of(params)
    if mesh not in self.jitted:
      self.jitted[mesh] = jax.jit(self.fn, out_shardings=parallel.replicated(mesh) if mesh is not None else None)
    return self.jitted[mesh](params, *inputs)


def global_batch(batch_size: int, mesh) -> int:
  """batch_size rounded up to a multiple of the mesh's batch shards (a multiple of the host count)."""
  shards = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES)
  return -(-batch_size // shards) * shards


def with_row_ids(fn):
  """fn(params, x) as the compiled encoder runs it, the batch's row ids passed through (the
  padding's are -1). uint8 pixels go in as they are: the models' embedders normalise them."""
  return lambda params, x, ids: (fn(params, x), ids)


def host_rows(total: int, hosts: int = 1, host: int = 0) -> dict:
  """The rows of a set of `total` a host holds when row j is host j % hosts's: {'ids' (int32, in the
  host's order), 'total', 'most' (the most rows any host holds)}."""
  return {'ids': np.arange(host, total, hosts, dtype=np.int32), 'total': total, 'most': -(-total // hosts)}


class Encoder:
  """An eval encoder f(params, x) (x: uint8 pixels, or token ids) over sets of any size:
  `encoder(params, x, batch_size, rows)` -> numpy [rows['total'], ...] on every host, where x holds
  this host's rows of the set, rows['ids'] (vlp.data.eval_set). Without rows, every host holds
  the whole set and feeds rows host, host + hosts, ...."""

  def __init__(self, fn):
    self.run = Replicated(with_row_ids(fn))

  def __call__(self, params, x, batch_size: int, rows: dict | None = None) -> np.ndarray:
    mesh = mesh_of(params)
    if mesh is None:  # one device, one host: x is the whole set
      return self._one_device(params, x, batch_size)
    hosts, me = jax.process_count(), jax.process_index()
    if rows is None:
      rows = host_rows(len(x), hosts, me)
      x = x[rows['ids']]
    return self._sharded(params, x, batch_size, mesh, rows)

  def _one_device(self, params, x, batch_size):
    out = []
    for a in range(0, len(x), batch_size):
      chunk = x[a:a + batch_size]
      emb, _ = self.run(params, _pad(chunk, batch_size), np.zeros(batch_size, np.int32))
      out.append(np.asarray(emb)[:len(chunk)])
    return np.concatenate(out)

  def _sharded(self, params, x, batch_size, mesh, rows):
    local_batch = global_batch(batch_size, mesh) // jax.process_count()
    steps = -(-rows['most'] // local_batch)  # the same on every host
    sharding = parallel.batch_sharding(mesh)
    out = None
    for s in range(steps):
      part = slice(s * local_batch, (s + 1) * local_batch)
      mine = rows['ids'][part]
      batch = _pad(x[part], local_batch)
      row_ids = np.pad(mine, (0, local_batch - len(mine)), constant_values=-1)
      emb, got = self.run(params, jax.make_array_from_process_local_data(sharding, batch),
                          jax.make_array_from_process_local_data(sharding, row_ids))
      emb, got = np.asarray(emb), np.asarray(got)
      if out is None:
        out = np.zeros((rows['total'], *emb.shape[1:]), emb.dtype)
      real = got >= 0
      out[got[real]] = emb[real]
    return out


def _pad(x, n):
  return np.pad(x, [(0, n - len(x))] + [(0, 0)] * (x.ndim - 1))
