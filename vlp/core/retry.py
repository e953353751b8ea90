"""Riding out object-storage outages: retries with backoff, counted (reads here; checkpoint
saves in vlp.checkpoint, within checkpoint.save_timeout_s).

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

from vlp.core import paths

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


class Backoff:
  """Backoff state of one file or save: 1, 2, 4, ... 30 s (with jitter), reset by a success;
  `failed` raises what is not transient, and StorageError once the storage has been
  unreachable for `deadline` seconds (default VLP_STORAGE_RETRY_S)."""

  def __init__(self, name: str, deadline: float | None = None, setting: str = 'VLP_STORAGE_RETRY_S'):
    self.name, self.since, self.tries = name, None, 0
    self.deadline, self.setting = deadline, setting

  def failed(self, e: BaseException, then: str = ''):
    if not is_transient(e):
      raise e
    now = time.monotonic()
    self.since = self.since or now
    deadline = deadline_s() if self.deadline is None else self.deadline
    wait = min(2.0 ** self.tries, 30.0) * (0.5 + random.random() / 2)
    if now + wait - self.since > deadline:
      raise paths.StorageError(f'{self.name}: storage unreachable for {now - self.since:.0f} s '
                               f'({type(e).__name__}: {paths.first_line(e, 200)}); gave up after '
                               f'{self.tries} retries ({self.setting}={deadline:g})') from None
    self.tries += 1
    print(f'vlp: storage: {self.name}: {type(e).__name__}: {paths.first_line(e, 120)}; retry {self.tries} '
          f'in {wait:.1f} s{then}', file=sys.stderr, flush=True)
    time.sleep(wait)

  def succeeded(self):
    self.since, self.tries = None, 0


def back_off(backoff: Backoff, error: Exception, cause: BaseException | None, then: str = ''):
  """Waits before a failed operation is made again; raises `error` where the storage will not
  come back: no cause (it hung past its deadline), a cause that is not transient, or an outage
  past the backoff's deadline."""
  if cause is None or not is_transient(cause):
    raise error
  try:
    backoff.failed(cause, then)
  except paths.StorageError:
    raise error from None


class Hung(TimeoutError):
  """An operation on the storage did not return within its deadline."""


class Stalled(Hung, ConnectionError):
  """The storage went away and came back, and the operation has not returned since: its client
  threads are stuck on the outage (transient: made again, afresh, it goes through)."""


def watched(fn, deadline: float, warn, probe: str | None, warn_after: float = 60.0, stall_after: float = 60.0,
            poll: float = 5.0, name: str = 'vlp-storage', setting: str = 'the deadline'):
  """fn() in a daemon thread (a thread stuck on a dead connection must not keep the process from
  exiting): its result, or its error; Hung past `deadline` seconds; warn(seconds waited) every
  `warn_after` (`setting` names the deadline in the error). With `probe` (a remote path), the storage is asked every `poll` seconds whether
  it answers: once it was seen down and has answered for `stall_after` seconds, Stalled."""
  import queue
  import threading
  done = queue.Queue()

  def call():
    try:
      done.put((fn(), None))
    except Exception as e:  # noqa: BLE001 - handed to the caller
      done.put((None, e))
  threading.Thread(target=call, daemon=True, name=name).start()
  start = time.monotonic()
  seen_down, up_since, warned = False, None, 0
  while True:
    waited = time.monotonic() - start
    try:
      result, error = done.get(timeout=max(0.0, min(poll if probe else warn_after, deadline - waited)))
      break
    except queue.Empty:
      waited = time.monotonic() - start
    if waited >= deadline:
      raise Hung(f'not written within {setting}={deadline:g}')
    if waited >= (warned + 1) * warn_after:
      warned += 1
      warn(waited)
    if probe:
      answers = _answers(probe, poll)
      seen_down = seen_down or not answers
      up_since = (up_since or time.monotonic()) if answers else None
      if seen_down and up_since is not None and time.monotonic() - up_since >= stall_after:
        raise Stalled(f'the storage answers again, but the save has not returned {stall_after:.0f} s after')
  if error is not None:
    raise error
  return result


def _answers(path: str, timeout: float) -> bool:
  try:
    paths.check_reachable(path, timeout=timeout)
    return True
  except paths.StorageError:
    return False


class RetryingReader:
  """A read-only binary file of object storage that survives outages: on a transient error it
  reopens the object and goes on at the same offset (see the module's docstring)."""

  def __init__(self, path: str):
    self.path, self._retry, self._pos, self._f = path, Backoff(path), 0, None
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
