"""The workdir's metrics files: metrics.jsonl (a JSON line per log step) and TensorBoard event
files under tb/, written by process 0 only, on local disk or an object store (gs://), and
read back by `vlp plot` and the tests."""
import io
import json
import time

import jax

from vlp.core import paths
from vlp.workdir import layout


class MetricWriter:

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported here: only process 0 writes
    path = layout.path(workdir, layout.METRICS)
    _truncate_after(path, resume_step)
    # an object store has no append: the log is kept and uploaded whole (RemoteLog)
    self.jsonl = RemoteLog(path) if paths.is_remote(path) else open(path, 'a')
    tb = layout.path(workdir, layout.TENSORBOARD)
    if paths.is_remote(tb):
      _register_remote_tensorboard(tb)
    self.tb = SummaryWriter(tb)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def read_jsonl(workdir: str) -> list[dict]:
  with paths.open(layout.path(workdir, layout.METRICS)) as f:
    return [json.loads(line) for line in f if _step_of(line) != float('inf')]


def _truncate_after(path: str, step: int):
  """On a resume, drops the lines a preempted run wrote after its last checkpoint,
  so the log holds one trajectory."""
  if not paths.exists(path):
    return
  with paths.open(path) as f:
    kept = [line for line in f if _step_of(line) <= step]
  paths.write_atomic(path, ''.join(kept))


def _step_of(line: str) -> float:
  """The step of a log line; a line a kill cut short (or an empty one) counts as after every step."""
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')


class RemoteLog:
  """A text file on an object store written like one opened with 'a': the lines so far are
  kept and the whole object uploaded on flush, at most every `interval` seconds (and on close)."""

  def __init__(self, path: str, interval: float = 30.0):
    self.path, self.interval, self.last = path, interval, 0.0
    self.text = paths.read_text(path) if paths.exists(path) else ''
    self.dirty = False

  def write(self, s: str):
    self.text += s
    self.dirty = True

  def flush(self, force: bool = False):
    """Uploads; an upload the storage refuses keeps the lines for the next try (the run goes
    on: a checkpoint, not the log, decides whether it can), and on close raises StorageError."""
    if self.dirty and (force or time.monotonic() - self.last >= self.interval):
      self.last = time.monotonic()
      try:
        paths.write_atomic(self.path, self.text)
        self.dirty = False
      except Exception as e:  # noqa: BLE001 - whatever the storage layer raised
        why = f'{self.path} could not be written ({type(e).__name__}: {paths.first_line(e, 200)})'
        if force:
          raise paths.StorageError(f'{why}; is the storage reachable?') from None
        print(f'{why}; keeping its lines for the next upload in {self.interval:.0f} s', flush=True)

  def close(self):
    self.flush(force=True)


class _RemoteEvents:
  """A TensorBoard event file on an object store, through vlp.core.paths (gcsfs): the bytes so
  far, uploaded whole on each flush (tensorboardX flushes every flush_secs and on close)."""

  def __init__(self, path):
    self.path, self.buffer, self.closed = path, io.BytesIO(), False

  def write(self, data):
    self.buffer.write(data)

  def flush(self):
    if not self.closed:
      try:  # in tensorboardX's writer thread: a refused upload is tried again on the next flush
        paths.write_atomic(self.path, self.buffer.getvalue())
      except Exception as e:  # noqa: BLE001
        print(f'{self.path} could not be written ({type(e).__name__}); trying again on the next flush', flush=True)

  def close(self):
    if not self.closed:
      self.flush()
      self.closed = True


class _RemoteEventsFactory:

  def open(self, path):
    return _RemoteEvents(path)

  def directory_check(self, path):
    del path  # object stores need no directories


def _register_remote_tensorboard(path: str):
  """tensorboardX's own gs:// writer uses google-cloud-storage and retries a dead endpoint for
  minutes at exit; this one goes through the same path layer as everything else."""
  from tensorboardX import record_writer
  record_writer.register_writer_factory(path.split('://', 1)[0], _RemoteEventsFactory())
