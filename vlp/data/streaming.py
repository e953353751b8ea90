"""Streaming Grain datasets over shard files read front to back (webdataset tars).

Training straight from img2dataset shards, without converting them: each
process takes its own shards (shard i goes to process i % process_count),
reads `cycle_length` of them at once, interleaved, in a new shard order every
epoch, and mixes examples in a shuffle window. The resume state is, per open
shard, how many records were taken from it: a restored iterator reopens the
shard and skips that many, so it continues with exactly the next record.
Converting to ArrayRecord (`vlp data convert`) gives a true global shuffle and
O(1) resume; streaming is for data that is read once or twice.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import itertools

import grain
from grain import experimental as grain_exp


class _ShardIterator(grain.DatasetIterator):
  """Records of one shard; its state is how many were taken."""

  def __init__(self, path: str, read: Callable[[str], Iterator[dict]]):
    super().__init__()
    self._path, self._read = path, read
    self._taken = 0
    self._records = None  # opened on first use: set_state may come first

  def __next__(self) -> dict:
    if self._records is None:
      self._records = itertools.islice(self._read(self._path), self._taken, None)
    rec = next(self._records)
    self._taken += 1
    return rec

  def get_state(self) -> dict:
    return {'path': self._path, 'taken': self._taken}

  def set_state(self, state: dict) -> None:
    if state['path'] != self._path:
      raise ValueError(f'iterator state is for shard {state["path"]}, not {self._path}: '
                       'the shard list or its order changed since the checkpoint')
    self._taken, self._records = state['taken'], None


class ShardDataset(grain.IterDataset):
  """One shard as a Grain IterDataset (picklable: a path and a module-level reader)."""

  def __init__(self, path: str, read: Callable[[str], Iterator[dict]]):
    super().__init__()
    self.path, self.read = path, read

  def __iter__(self) -> _ShardIterator:
    return _ShardIterator(self.path, self.read)


class _OpenShard:
  """path -> ShardDataset, a class so Grain can pickle it into workers."""

  def __init__(self, read: Callable[[str], Iterator[dict]]):
    self.read = read

  def __call__(self, path: str) -> ShardDataset:
    return ShardDataset(path, self.read)


def shard_stream(paths: Sequence[str], read: Callable[[str], Iterator[dict]], *, seed: int,
                 process_index: int = 0, process_count: int = 1, cycle_length: int = 4,
                 shuffle_window: int = 1000) -> grain.IterDataset:
  """Endless records of this process's shards, interleaved and window-shuffled."""
  mine = list(paths)[process_index::process_count]
  if not mine:
    raise ValueError(f'{len(paths)} shard(s) for {process_count} processes: process '
                     f'{process_index} gets none; write at least one shard per process')
  files = grain.MapDataset.source(mine).shuffle(seed=seed).repeat()
  ds = grain_exp.InterleaveIterDataset(files.map(_OpenShard(read)),
                                       cycle_length=min(cycle_length, len(mine)))
  if shuffle_window > 1:
    ds = grain_exp.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  return ds
