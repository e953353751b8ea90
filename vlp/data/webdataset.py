"""img2dataset webdataset shards (LAION, WIT images, any URL list) read as they are.

img2dataset writes `NNNNN.tar` shards whose members come in groups of one key:
`KEY.jpg` (or .png/.webp, the image as downloaded and resized), `KEY.txt`
(the caption) and `KEY.json` (url, status, width, height, the source's extra
columns such as similarity or punsafe), and beside each shard `NNNNN.parquet`
(every input row, failed downloads too) and `NNNNN_stats.json`.

A shard is read front to back as a tar stream (no index, so a remote or
half-written file costs one pass), member groups become `records` dicts, and
everything that cannot become one is yielded as `records.skipped(key, reason)`:
  missing_image    a key with a caption but no image member
  missing_caption  a key with an image but no .txt
  bad_utf8         a caption or .json that is not UTF-8 (or not JSON)
  truncated_shard  the tar ends before its end-of-archive marker (what comes
                   after the cut is lost and unknown: one skip for it)
  bad_shard        the file is not a tar at all
  unreadable_shard the file cannot be opened (deleted since it was listed)
  unsafe_member    a member named by an absolute path or one with `..` in it
A remote shard is read through vlp.core.retry: an outage of the storage is ridden out
(each retry yields a `records.retried` note, counted apart: nothing is lost),
and one that outlasts VLP_STORAGE_RETRY_S stops the run with a StorageError.

Members are read into memory only: nothing of a shard is ever written to disk,
and a member whose name points outside the archive is skipped before it is read.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
import gzip
import json
import os
import tarfile

from vlp.core import paths, retry
from vlp.data import files, records

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
SUFFIX = '.tar'


def expand(patterns: str | Sequence[str]) -> list[str]:
  return files.expand(patterns, SUFFIX)


def _split(name: str) -> tuple[str, str]:
  """'dir/000010042.jpg' -> ('000010042', 'jpg'): the key is up to the first dot, as webdataset does."""
  base = os.path.basename(name)
  key, _, ext = base.partition('.')
  return key, ext.lower()


def _unsafe(name: str) -> bool:
  """An absolute member name, or one that climbs out of the archive ('a/../../b')."""
  return name.startswith(('/', '\\')) or os.path.isabs(name) or '..' in name.replace('\\', '/').split('/')


def _record(key: str, group: dict[str, bytes]) -> dict:
  image_ext = next((e for e in IMAGE_EXTS if e in group), None)
  if image_ext is None:
    return records.skipped(key, 'missing_image')
  if 'txt' not in group:
    return records.skipped(key, 'missing_caption')
  try:
    caption = group['txt'].decode('utf-8')
    meta = json.loads(group['json'].decode('utf-8')) if 'json' in group else {}
  except (UnicodeDecodeError, ValueError):
    return records.skipped(key, 'bad_utf8')
  if not isinstance(meta, dict):
    meta = {'json': meta}
  url = str(meta.pop('url', '') or '')
  language = str(meta.get('language') or meta.get('LANGUAGE') or '')
  meta.pop('caption', None)  # the .txt is the caption; not stored twice
  return records.make(key, group[image_ext], caption, language, url, meta)


class _EndWatch:
  """A file that remembers whether anyone read past its end.

  A well-formed tar ends with zero blocks and tarfile stops at the first one,
  so it never reads to the end of the file; reaching it means the archive was
  cut off (tarfile itself treats a cut at a member boundary as a clean end).
  """

  def __init__(self, f):
    self._f, self.short_read = f, False

  def read(self, n=-1):
    data = self._f.read(n)
    if n is not None and n > 0 and len(data) < n:
      self.short_read = True
    return data

  def seek(self, *args):
    return self._f.seek(*args)

  def tell(self):
    return self._f.tell()


def _open(raw):
  if raw.read(2) == b'\x1f\x8b':  # a .tar.gz: decompressed on the fly
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode='rb')
  raw.seek(0)
  return raw


def read_shard(path: str) -> Iterator[dict]:
  """Records of one shard in file order (skipped ones included, with their reason, and a
  records.retried note for each retry of the storage)."""
  shard = paths.basename(path)
  try:
    reader = retry.open_remote(path)  # local, or remote read as a stream that rides out outages
  except paths.StorageError:  # unreachable for longer than the retries last: the run stops
    raise
  except OSError:  # deleted since the run listed it
    yield records.skipped(f'{shard}:', 'unreadable_shard')
    return
  retried = 0
  for record in _read_shard(reader, shard):
    # the retries (a RetryingReader's; a local file has none) are noted before the record they delayed
    retries = getattr(reader, 'retries', 0)
    yield from (records.retried(record.get('key', '')) for _ in range(retries - retried))
    retried = retries
    yield record


def _read_shard(reader, shard: str) -> Iterator[dict]:
  key, group = None, {}
  try:
    f = _open(reader)
  except paths.StorageError:
    raise
  except OSError:
    yield records.skipped(f'{shard}:', 'unreadable_shard')
    return
  with f:
    watch = _EndWatch(f)
    try:
      tar = tarfile.open(fileobj=watch, mode='r:')
    except paths.StorageError:
      raise
    except (tarfile.TarError, OSError, EOFError):
      yield records.skipped(f'{shard}:', 'bad_shard')
      return
    try:
      for member in tar:
        if not member.isfile():
          continue
        if _unsafe(member.name):
          yield records.skipped(f'{shard}:{member.name}', 'unsafe_member')
          continue
        k, ext = _split(member.name)
        if k != key and key is not None:
          yield _record(key, group)
          group = {}
        key = k
        group[ext] = tar.extractfile(member).read()
      if watch.short_read:
        raise tarfile.ReadError('no end-of-archive marker')
    except paths.StorageError:
      raise
    except (tarfile.TarError, OSError, EOFError):
      # The members read whole still make their record (a key cut before its
      # .txt comes out as missing_caption); the rest of the shard is lost.
      if group:
        yield _record(key, group)
      yield records.skipped(f'{shard}:{key or ""}', 'truncated_shard')
      return
  if key is not None:
    yield _record(key, group)


def read_shards(paths: Sequence[str], process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """This process's shards (every process_count-th), one after the other."""
  for path in list(paths)[process_index::process_count]:
    yield from read_shard(path)


def download_stats(path: str) -> dict | None:
  """The `NNNNN_stats.json` img2dataset wrote beside a shard (count, successes, failures), if any."""
  stats = path[:-len(SUFFIX)] + '_stats.json' if path.endswith(SUFFIX) else None
  if not stats or not paths.isfile(stats):
    return None
  with paths.open(stats) as f:
    return json.load(f)
