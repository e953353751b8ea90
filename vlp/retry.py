"""Riding out object-storage outages on the read path: retries with backoff, counted.

The storage clients retry a failed request themselves (gcsfs: about 30 s, then it
raises). A longer outage (a zone's network, an emulator restarted) would otherwise
end a shard early and lose its remaining records. A remote file opened through
`open_remote` instead reopens the object and reads on from the same offset, after
1, 2, 4, ... 30 s, until the storage answers or VLP_STORAGE_RETRY_S seconds
(default 600) have passed without progress; then it raises StorageError naming the
path. Each retry prints one line and adds to the reader's `retries` (the webdataset
reader passes them on as records.retried notes: `storage_retries` in the metrics).

Only transient failures are retried (a refused or reset connection, a timeout,
HTTP 408/429/5xx); a missing object or a denied one fails at once.
"""
from __future__ import annotations

import os
import random
import sys
import time

from vlp import paths

_TRANSIENT_NAMES = ('ClientConnectorError', 'ClientOSError', 'ServerDisconnectedError', 'ServerTimeoutError',
                    'ClientPayloadError', 'TransportError', 'ServiceUnavailable', 'TooManyRequests')
_TRANSIENT_CODES = (408, 429, 500, 502, 503, 504)


def deadline_s() -> float:
  return float(os.environ.get('VLP_STORAGE_RETRY_S', 600))


def is_transient(e: BaseException) -> bool:
  """A failure the storage may recover from: retry it (anything else is final)."""
  while e is not None:
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _TRANSIENT_NAMES:
      return True
    if getattr(e, 'code', None) in _TRANSIENT_CODES:  # gcsfs HttpError, google.api_core errors
      return True
    e = e.__cause__ or e.__context__
  return False


class _Retrying:
  """Backoff state of one file: 1, 2, 4, ... 30 s (with jitter), reset by a read that succeeds."""

  def __init__(self, path: str):
    self.path, self.since, self.tries = path, None, 0

  def failed(self, e: BaseException):
    if not is_transient(e):
      raise e
    now = time.monotonic()
    self.since = self.since or now
    if now - self.since > deadline_s():
      raise paths.StorageError(f'{self.path}: storage unreachable for {now - self.since:.0f} s '
                               f'({type(e).__name__}: {paths.first_line(e, 200)}); gave up after '
                               f'{self.tries} retries (VLP_STORAGE_RETRY_S={deadline_s():.0f})') from None
    wait = min(2.0 ** self.tries, 30.0) * (0.5 + random.random() / 2)
    self.tries += 1
    print(f'vlp: storage: {self.path}: {type(e).__name__}: {paths.first_line(e, 120)}; retry {self.tries} '
          f'in {wait:.1f} s', file=sys.stderr, flush=True)
    time.sleep(wait)

  def succeeded(self):
    self.since, self.tries = None, 0


class RetryingReader:
  """A read-only binary file of object storage that survives outages: on a transient error it
  reopens the object and goes on at the same offset (see the module's docstring)."""

  def __init__(self, path: str):
    self.path, self._retry, self._pos, self._f = path, _Retrying(path), 0, None
    self.retries = 0  # of this file
    self._reopen()

  def _reopen(self):
    while True:
      try:
        if self._f is not None:
          self._close_quietly()
        self._f = paths.open(self.path, 'rb')
        if self._pos:
          self._f.seek(self._pos)
        return
      except Exception as e:  # noqa: BLE001 - is_transient decides
        self._failed(e)

  def _failed(self, e):
    self._retry.failed(e)
    self.retries += 1

  def _close_quietly(self):
    try:
      self._f.close()
    except Exception:  # noqa: BLE001 - the connection is gone already
      pass
    self._f = None

  def read(self, n: int = -1) -> bytes:
    while True:
      try:
        data = self._f.read(n)
        break
      except Exception as e:  # noqa: BLE001 - is_transient decides
        self._failed(e)
        self._reopen()
    self._retry.succeeded()
    self._pos += len(data)
    return data

  def seek(self, offset: int, whence: int = 0) -> int:
    self._pos = self._f.seek(offset, whence)
    return self._pos

  def tell(self) -> int:
    return self._pos

  def close(self):
    if self._f is not None:
      self._close_quietly()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_remote(path: str):
  """A binary reader of `path`: a RetryingReader for object storage, the plain file locally."""
  return RetryingReader(path) if paths.is_remote(path) else paths.open(path, 'rb')
