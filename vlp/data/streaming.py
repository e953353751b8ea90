"""Streaming Grain datasets over shard files read front to back (webdataset tars).

Training straight from img2dataset shards, without converting them. Every
reader, a (process, Grain worker) pair, reads its own disjoint part of the
data with its own seed: with R = processes x workers readers, reader
r = process + processes x worker takes shards r, r + R, r + 2R, ... (so shard i
goes to process i % process_count); with fewer shards than readers, every
shard is split by rows, reader parts taking every k-th record of a shard
(MaxText's way). A reader reads `cycle_length` of its parts at once (at most
as many as it has), interleaved, and mixes examples in a shuffle window. So
no record appears twice in a global batch until a reader has gone through all
of its parts. The resume state is, per open part, how many records were taken
from it: a restored iterator reopens the shard and skips that many, so it
continues with exactly the next record.
Converting to ArrayRecord (`vlp data convert`) gives a true global shuffle and
O(1) resume; streaming is for data that is read once or twice.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import itertools
import math

import grain
import numpy as np
from grain import experimental as grain_exp


class ShardIterator(grain.DatasetIterator):
  """Records of one shard (or of its part `rows` = (j, k): records j, j + k, j + 2k, ...);
  its state is how many were taken."""

  def __init__(self, path: str, read: Callable[[str], Iterator[dict]], rows: tuple[int, int] = (0, 1)):
    super().__init__()
    self._path, self._read, self._rows = path, read, tuple(rows)
    self._taken = 0
    self._records = None  # opened on first use: set_state may come first

  def __next__(self) -> dict:
    if self._records is None:
      j, k = self._rows
      self._records = itertools.islice(self._read(self._path), j + k * self._taken, None, k)
    rec = next(self._records)
    self._taken += 1
    return rec

  def get_state(self) -> dict:
    state = {'path': self._path, 'taken': self._taken}
    if self._rows != (0, 1):
      state['rows'] = list(self._rows)
    return state

  def set_state(self, state: dict) -> None:
    if state['path'] != self._path or tuple(state.get('rows', (0, 1))) != self._rows:
      raise ValueError(f'iterator state is for shard {state["path"]} (rows {state.get("rows", "all")}), not '
                       f'{self._path}: the shard list or its order changed since the checkpoint (or the number '
                       'of readers, processes x data.num_workers)')
    self._taken, self._records = state['taken'], None


class _InterleaveIterator(grain.DatasetIterator):
  """Round-robin over `cycle_length` open shards; a finished shard is replaced by the next file.

  Everything runs in the calling thread: reading a local tar costs a few
  percent of decoding its images, while Grain's InterleaveIterDataset gives
  every open shard a prefetch thread that contends for the worker's GIL (2
  workers on a busy 2-core machine: 578 images/s with 4 open shards, 1011
  with 1). Its state is the next file's index, the
  slot whose turn it is, and per open slot the file index and records taken.

  `pass_check` = (parts per pass, shuffle window, who): when a fresh iterator
  starts its second pass over the parts, a record comes again about
  (records so far) x (open slots) / parts records after its first read; if
  that is less than the shuffle window, the window would hold it twice: stop.
  """

  def __init__(self, files: grain.MapDataset, read: Callable[[str], Iterator[dict]], cycle_length: int,
               pass_check: tuple[int, int, str] | None = None):
    super().__init__()
    self._files, self._read, self._cycle_length = files, read, cycle_length
    self._next_file, self._turn = 0, 0
    self._slots: list[tuple[int, ShardIterator] | None] = [None] * cycle_length
    self._pass_check, self._yielded = pass_check, 0  # yielded: since a fresh start (None after a restore)

  def _check_pass(self):
    parts, window, who = self._pass_check or (0, 0, '')
    if not self._yielded or self._next_file != parts:  # restored, not at the pass's end, or empty (see below)
      return
    again = self._yielded * self._cycle_length // parts  # records between two reads of a record
    if again < window:
      raise ValueError(f'{who} reads {parts} shard part(s), {self._yielded} records per pass: a record comes '
                       f'again about {again} records later, within data.shuffle_window={window}; lower '
                       f'data.shuffle_window to at most {again}, or use fewer data.num_workers or more shards')

  def _open(self, file_index: int, taken: int = 0, saved: dict | None = None) -> tuple[int, ShardIterator]:
    """Part `file_index` of the list, `taken` records in; `saved` (a saved state) must be of that part."""
    path, rows = self._files[file_index]
    shard = ShardIterator(path, self._read, rows)
    shard.set_state({'path': path, 'rows': rows, 'taken': taken} if saved is None else saved)  # refuses another
    return file_index, shard

  def __next__(self) -> dict:
    empty = set()  # files found empty since the last record: when one comes round again, all are
    while True:
      slot = self._slots[self._turn]
      if slot is None:
        self._check_pass()
        slot = self._slots[self._turn] = self._open(self._next_file)
        self._next_file += 1
      try:
        rec = next(slot[1])
      except StopIteration:
        state = slot[1].get_state()
        if state['taken'] == 0:
          part = (state['path'], tuple(state.get('rows', ())))
          if part in empty:
            raise ValueError(f'every shard (part) of this reader is empty (e.g. {state["path"]})') from None
          empty.add(part)
        self._slots[self._turn] = None
        continue
      self._turn = (self._turn + 1) % self._cycle_length
      if self._yielded is not None:
        self._yielded += 1
      return rec

  def get_state(self) -> dict:
    open_slots = [None if s is None else {'file': s[0], **s[1].get_state()} for s in self._slots]
    return {'next_file': self._next_file, 'turn': self._turn, 'slots': open_slots}

  def set_state(self, state: dict) -> None:
    if len(state['slots']) != self._cycle_length:
      raise ValueError(f'iterator state has {len(state["slots"])} open shards, this pipeline '
                       f'{self._cycle_length}: data.cycle_length changed since the checkpoint')
    self._next_file, self._turn, self._yielded = state['next_file'], state['turn'], None
    self._slots = [None if s is None else self._open(s['file'], s['taken'], {k: v for k, v in s.items() if k != 'file'})
                   for s in state['slots']]


def reader_parts(num_shards: int, reader: int, readers: int) -> list[tuple[int, tuple[int, int]]]:
  """(shard index, (j, k)) of every part that `reader` of `readers` reads: whole shards
  r, r + R, ... when there are at least as many shards as readers, else every shard in
  k = ceil(R / shards) parts by rows (records j, j + k, ...), the parts dealt out in turn."""
  k = 1 if num_shards >= readers else math.ceil(readers / num_shards)
  parts = [(s, (j, k)) for j in range(k) for s in range(num_shards)]
  return parts[reader::readers]


def reader_seed(seed: int, reader: int) -> int:
  """The shuffle seed of one reader: every reader its own; reader 0 keeps `seed`, so a
  one-process job without workers reads in the same order as before readers had seeds."""
  return int(np.random.SeedSequence([seed, reader]).generate_state(1)[0]) if reader else seed


class _ReaderStream(grain.IterDataset):
  """The records of one reader: this process's, or in a Grain worker (which calls
  set_slice(slice(worker, None, workers))) that worker's, parts of the shards,
  interleaved, window-shuffled and mapped with `transform` (a random map), all with the
  reader's own seed."""

  def __init__(self, paths, read, *, seed, process_index, process_count, cycle_length, shuffle_window, transform):
    super().__init__()
    self.paths, self.read, self.seed = list(paths), read, seed
    self.process_index, self.process_count = process_index, process_count
    self.cycle_length, self.shuffle_window, self.transform = cycle_length, shuffle_window, transform
    self.worker, self.workers = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self.worker, self.workers = sl.start or 0, sl.step or 1

  def _parts(self):
    reader = self.process_index + self.process_count * self.worker
    parts = reader_parts(len(self.paths), reader, self.process_count * self.workers)
    return reader, [(self.paths[s], rows) for s, rows in parts]

  def __iter__(self) -> grain.DatasetIterator:
    reader, parts = self._parts()
    seed = reader_seed(self.seed, reader)
    files = grain.MapDataset.source(parts).shuffle(seed=seed).repeat()
    who = (f'reader {reader} of {self.process_count * self.workers} (process {self.process_index}, '
           f'worker {self.worker} of {self.workers})')
    ds = _Interleave(files, self.read, min(self.cycle_length, len(parts)),
                     (len(parts), self.shuffle_window if self.shuffle_window > 1 else 0, who))
    if self.shuffle_window > 1:
      ds = grain_exp.WindowShuffleIterDataset(ds, window_size=self.shuffle_window, seed=seed)
    if self.transform is not None:
      ds = ds.random_map(self.transform, seed=seed)
    return ds.__iter__()


class _Interleave(grain.IterDataset):
  """Records of an endless list of (path, rows) parts, `cycle_length` at a time (see _InterleaveIterator)."""

  def __init__(self, files: grain.MapDataset, read: Callable[[str], Iterator[dict]], cycle_length: int,
               pass_check: tuple[int, int, str] | None = None):
    super().__init__()
    self.files, self.read, self.cycle_length, self.pass_check = files, read, cycle_length, pass_check

  def __iter__(self) -> _InterleaveIterator:
    return _InterleaveIterator(self.files, self.read, self.cycle_length, self.pass_check)


def shard_stream(paths: Sequence[str], read: Callable[[str], Iterator[dict]], *, seed: int,
                 process_index: int = 0, process_count: int = 1, cycle_length: int = 4,
                 shuffle_window: int = 1000, transform=None) -> grain.IterDataset:
  """Endless records of this reader's parts of the shards, interleaved and window-shuffled,
  then `transform(record, rng)` (e.g. pipeline.Preprocess) with the reader's seed."""
  if not paths:
    raise ValueError('no shards to read')
  return _ReaderStream(paths, read, seed=seed, process_index=process_index, process_count=process_count,
                       cycle_length=cycle_length, shuffle_window=shuffle_window, transform=transform)
