"""One path layer for local and remote paths (gs://, s3://): etils.epath, which Orbax and Grain use too.

Every file vlp reads or writes goes through here: the workdir (config.json,
checkpoints, metrics.jsonl, tb/), tokenizers, data shards, eval data, exports.
A local path stays a plain path (`~` expanded); a remote one is never made
absolute or created on the local disk.

gs:// goes through gcsfs (fsspec); an emulator is reached through the
standard variables: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and
TENSORSTORE_GCS_HTTP_URL (tensorstore, i.e. Orbax's arrays). With an emulator,
gcsfs's first probe of the bucket type over gRPC (which an emulator does not
answer: it waits about a minute) is turned off
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false) unless the variable is set already;
this must happen before gcsfs is imported, hence here at import.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import glob as glob_lib
import os
import re

if os.environ.get('STORAGE_EMULATOR_HOST'):
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

from etils import epath  # noqa: E402

_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')
_SCHEME = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
CREDENTIALS_HINT = ('set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login` '
                    '(for an emulator: STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL)')


class StorageError(FileNotFoundError):
  """A remote path that cannot be reached: no bucket, no credentials, no network."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """An exception's message cut to its first line (the storage clients' run to pages)."""
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def is_remote(path) -> bool:
  """gs://, s3://, ...: anything with a scheme but file://."""
  m = _SCHEME.match(str(path))
  return bool(m) and m.group(1) != 'file'


def _local(path: str) -> str:
  path = str(path)
  return path[len('file://'):] if path.startswith('file://') else os.path.expanduser(path)


def path(p) -> epath.Path:
  return epath.Path(str(p) if is_remote(p) else _local(p))


def normalize(p) -> str:
  """The string form: remote paths as given, local ones with ~ expanded."""
  return str(p).rstrip('/') if is_remote(p) else _local(p)


def abspath(p) -> str:
  return normalize(p) if is_remote(p) else os.path.abspath(_local(p))


def join(base, *parts) -> str:
  if is_remote(base):
    return '/'.join([str(base).rstrip('/'), *(str(x).strip('/') for x in parts)])
  return os.path.join(_local(base), *map(str, parts))


def basename(p) -> str:
  return str(p).rstrip('/').rsplit('/', 1)[-1] if is_remote(p) else os.path.basename(p)


def dirname(p) -> str:
  return str(p).rstrip('/').rsplit('/', 1)[0] if is_remote(p) else os.path.dirname(p)


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def isfile(p) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def makedirs(p):
  """A directory and its parents (on object stores: nothing to make, and nothing is made locally)."""
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p) -> list[str]:
  return sorted(x.name for x in path(p).iterdir())


def open(p, mode: str = 'r', **kwargs):  # noqa: A001 - the builtin's name on purpose
  if not is_remote(p):
    import builtins
    return builtins.open(_local(p), mode, **kwargs)
  return path(p).open(mode, **kwargs)


def read_bytes(p) -> bytes:
  with open(p, 'rb') as f:
    return f.read()


def read_text(p) -> str:
  with open(p, 'r') as f:
    return f.read()


def write_atomic(p, data: bytes | str):
  """Writes a whole file so a reader sees the old or the new content, never half: locally a
  temporary file and a rename; on an object store one upload (an object appears whole)."""
  mode = 'wb' if isinstance(data, bytes) else 'w'
  if is_remote(p):
    with open(p, mode) as f:
      f.write(data)
    return
  local = _local(p)
  with open(local + '.tmp', mode) as f:
    f.write(data)
  os.replace(local + '.tmp', local)


def copy(src, dst):
  with open(src, 'rb') as f:
    data = f.read()
  with open(dst, 'wb') as f:
    f.write(data)


def remove(p):
  q = path(p)
  if q.is_dir():
    q.rmtree()
  elif q.exists():
    q.unlink()


def rename(src, dst):
  if is_remote(src):
    path(src).rename(dst)
  else:
    os.replace(_local(src), _local(dst))


def brace_ranges(pattern: str) -> list[str]:
  """'a/{00000..00002}.tar' -> a/00000.tar, a/00001.tar, a/00002.tar (width kept, as in bash)."""
  m = _RANGE.search(pattern)
  if not m:
    return [pattern]
  lo, hi = m.group(1), m.group(2)
  width = len(lo) if lo.startswith('0') or len(lo) == len(hi) else 0
  out = []
  for i in range(int(lo), int(hi) + 1):
    out += brace_ranges(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
  return out


def has_magic(p) -> bool:
  return glob_lib.has_magic(str(p))


def glob(pattern) -> list[str]:
  """Sorted matches of a glob (local or remote; `{a..b}` ranges expanded first)."""
  out = []
  for p in brace_ranges(str(pattern)):
    if not is_remote(p):
      out += glob_lib.glob(_local(p))
      continue
    scheme, rest = p.split('://', 1)
    parts = rest.split('/')
    first = next((i for i, x in enumerate(parts) if glob_lib.has_magic(x)), len(parts))
    if first == len(parts):
      out += [p] if exists(p) else []
      continue
    if first == 0:
      raise ValueError(f'{p!r}: a bucket name cannot be a glob')
    base = path(f'{scheme}://' + '/'.join(parts[:first]))
    if not base.exists():
      continue
    out += [str(x) for x in base.glob('/'.join(parts[first:]))]
  return sorted(set(out))


def bucket_root(p) -> str:
  scheme, rest = str(p).split('://', 1)
  return f'{scheme}://{rest.split("/")[0]}'


def check_reachable(p, what: str = 'path', timeout: float = 30.0):
  """For a remote path: its bucket answers (exists, credentials work), within `timeout` seconds.
  Raises StorageError with one line naming the path and what to set. Local paths pass."""
  if not is_remote(p):
    return
  root = bucket_root(p)
  pool = concurrent.futures.ThreadPoolExecutor(1)
  future = pool.submit(lambda: path(root).exists())
  try:
    found = future.result(timeout=timeout)
  except concurrent.futures.TimeoutError:
    raise StorageError(f'{what} {p}: no answer from {root} in {timeout:.0f} s (network, or an emulator that '
                       f'is not running?); {CREDENTIALS_HINT}') from None
  except Exception as e:  # noqa: BLE001 - any client error becomes one line
    raise StorageError(f'{what} {p}: cannot access {root} ({type(e).__name__}: {first_line(e, 200)}); '
                       f'{CREDENTIALS_HINT}') from None
  finally:
    pool.shutdown(wait=False)
  if not found:
    raise StorageError(f'{what} {p}: bucket {root} does not exist or these credentials cannot see it; '
                       f'create it or {CREDENTIALS_HINT}')


@contextlib.contextmanager
def local_copy_if_remote(p):
  """Yields a local file path with the content of p (for readers that only take local files)."""
  if not is_remote(p):
    yield _local(p)
    return
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    local = os.path.join(d, basename(p))
    copy(p, local)
    yield local
