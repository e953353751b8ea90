"""ArrayRecord: the training format (random access, global shuffle, exact resume).

Files hold `vlp.data.records.encode` bytes, one record per entry, written with
`group_size:1` so that reading entry i decompresses entry i alone: Grain can
then read any index cheaply, which is what a global shuffle and a resume that
is a few integers need.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
import hashlib
import os
import tempfile

from array_record.python import array_record_module
import grain

from vlp.core import paths as vpaths
from vlp.data import files, records

SUFFIX = '.array_record'
WRITER_OPTIONS = 'group_size:1'


def write(path: str, recs: Iterable[dict]) -> int:
  """Writes records (skipped ones must be filtered out before) to `path`; returns the count."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  n = 0
  try:
    for rec in recs:
      writer.write(records.encode(rec))
      n += 1
  finally:
    writer.close()
  os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
  return n


def expand(paths: str | Sequence[str]) -> list[str]:
  return files.expand(paths, SUFFIX)


def looks_like(path: str) -> bool:
  """Whether a path (file, glob or directory) names ArrayRecord files rather than tar shards."""
  if not vpaths.has_magic(path) and vpaths.isdir(path):
    return any(f.endswith(SUFFIX) for f in vpaths.listdir(path))
  return path.endswith(SUFFIX)


def cache_dir() -> str:
  return os.path.join(tempfile.gettempdir(), 'vlp-array-record-cache')


def local_files(paths: Sequence[str]) -> list[str]:
  """The files as local paths: array_record's reader opens local files only, so a remote
  file (gs://...) is copied once into cache_dir() (named by its path and size) and read there."""
  out = []
  for p in paths:
    if not vpaths.is_remote(p):
      out.append(p)
      continue
    size = vpaths.path(p).stat().length
    name = hashlib.sha1(f'{p}:{size}'.encode()).hexdigest()[:16] + '-' + vpaths.basename(p)
    local = os.path.join(cache_dir(), name)
    if not os.path.exists(local):
      os.makedirs(cache_dir(), exist_ok=True)
      vpaths.copy(p, f'{local}.{os.getpid()}.tmp')
      os.replace(f'{local}.{os.getpid()}.tmp', local)
    out.append(local)
  return out


class Source(grain.sources.RandomAccessDataSource):
  """Random-access records over ArrayRecord files, in file order then entry order."""

  def __init__(self, paths: str | Sequence[str]):
    self.paths = expand(paths)
    self._data = grain.sources.ArrayRecordDataSource(local_files(self.paths))

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    return records.decode(self._data[index])

  def __repr__(self) -> str:
    return f'arrayrecord.Source({len(self.paths)} files, {len(self)} records)'
