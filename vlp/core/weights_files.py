"""Safetensors weights of an export directory: one file, or shards with an index.

Large checkpoints are published as `model-00001-of-00004.safetensors` ...
and `model.safetensors.index.json` ({"metadata": {"total_size"},
"weight_map": {name: file}}), the layout transformers and the Hub read. A
model of at most `max_shard_bytes` stays one `model.safetensors`.

Writing: the tensors go into shards in name order; shard k is written by
process k % processes, and each tensor is gathered from the devices just
before it is written, so no host ever holds more than one shard (plus the
tensor in flight), whatever the model's size. Every process walks the same
tensors in the same order, as the gathers of a multi-process job require.
"""
import json

import numpy as np
import safetensors.numpy

from vlp.core import paths

SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
MAX_SHARD_BYTES = 2 * 2**30  # 2 GiB shards (transformers' default is 5 GB; smaller ones resume and stream better)


def shard_plan(sizes: dict, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
  """Names in name order, cut into shards of at most max_shard_bytes (a larger tensor alone)."""
  shards, current, used = [], [], 0
  for name in sorted(sizes):
    if current and used + sizes[name] > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += sizes[name]
  return shards + [current] if current else shards


def shard_name(k: int, count: int) -> str:
  return SINGLE if count == 1 else f'model-{k + 1:05d}-of-{count:05d}.safetensors'


def write(out: str, specs: dict, fetch, metadata: dict, max_shard_bytes: int = MAX_SHARD_BYTES,
          processes: int = 1, process: int = 0) -> list[str]:
  """Writes the weights into `out`; returns the files this process wrote.

  specs: {name: (shape, dtype)} of every tensor as stored; fetch(name) -> its numpy array,
  which every process calls for every tensor in the same order (a gather in a multi-process
  job; what it returns is kept only by the process writing its shard).
  """
  sizes = {k: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for k, (shape, dtype) in specs.items()}
  shards = shard_plan(sizes, max_shard_bytes)
  meta = {k: str(v) for k, v in metadata.items()}
  written = []
  for k, names in enumerate(shards):
    mine = k % processes == process
    tensors = {}
    for name in names:
      x = fetch(name)
      if mine:
        tensors[name] = np.asarray(x).astype(specs[name][1])
    if mine:
      file = shard_name(k, len(shards))
      paths.write_atomic(paths.join(out, file), safetensors.numpy.save(tensors, metadata=meta))
      written.append(file)
  if len(shards) > 1 and process == 0:
    index = {'metadata': {'total_size': sum(sizes.values()), **meta},
             'weight_map': {name: shard_name(k, len(shards)) for k, names in enumerate(shards) for name in names}}
    with paths.open(paths.join(out, INDEX), 'w') as f:
      json.dump(index, f, indent=2)
    written.append(INDEX)
  return written


def read_file(path: str) -> dict:
  """{dotted name: array} of one safetensors file, local or remote (bfloat16 included, which
  safetensors' in-memory numpy loader does not read)."""
  with paths.local_copy_if_remote(path) as local:
    return safetensors.numpy.load_file(local)


def read(directory: str) -> dict:
  """{name: array} of an export directory's weights, one file or shards."""
  index = paths.join(directory, INDEX)
  if not paths.exists(index):
    return read_file(paths.join(directory, SINGLE))
  with paths.open(index) as f:
    weight_map = json.load(f)['weight_map']
  out = {}
  for file in sorted(set(weight_map.values())):
    out.update(read_file(paths.join(directory, file)))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise ValueError(f'{directory}: {INDEX} names {len(missing)} tensors its shards do not hold, e.g. {missing[0]!r}')
  return out


def exists(directory: str) -> bool:
  return paths.exists(paths.join(directory, SINGLE)) or paths.exists(paths.join(directory, INDEX))
