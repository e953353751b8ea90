"""Checks of the workdir and the other paths of a run, before anything compiles.

- A remote path (gs://...) of the config whose bucket does not answer (no such
  bucket, no credentials, no network, an emulator that is down) is one line
  naming the path and what to set (vlp.core.paths.check_reachable).
- A multi-process run on a local workdir: every process must see the same
  directory (a shared file system), or the processes would each keep their
  own checkpoints and none could resume. Each process writes a marker file;
  after a barrier process 0 must see all of them; otherwise every process
  stops with one line saying to use gs:// or a shared file system.
- Then XLA's persistent compilation cache is enabled (vlp.workdir.cache).
"""
import os
import time

import jax
import numpy as np

from vlp.core import paths
from vlp.core.config import ConfigError
from vlp.workdir import cache as compile_cache, layout

def remote_paths(config, workdir: str) -> list[tuple[str, str]]:
  """(what, path) of every remote path the run will read or write."""
  out = [('workdir', workdir)]
  d = config.get('data')
  if d is not None:
    for key in ('train', 'eval', 'tokenizer'):
      for p in str(d.get(key) or '').split(','):
        out.append((f"config key 'data.{key}'", p.strip()))
  for name, e in (config.get('evals') or {}).items():
    for key in ('path', 'image_dir'):
      if hasattr(e, 'get') and e.get(key):
        out.append((f"config key 'evals.{name}.{key}'", e.get(key)))
  if config.get('compile_cache') not in (None, '', 'workdir'):
    out.append(("config key 'compile_cache'", config.compile_cache))
  return [(w, p) for w, p in out if p and paths.is_remote(p)]


def check_reachable(config, workdir: str, timeout: float = 30.0):
  seen = set()
  for what, p in remote_paths(config, workdir):
    root = paths.bucket_root(p)
    if root not in seen:
      seen.add(root)
      paths.check_reachable(p, what, timeout=timeout)


def check_shared(workdir: str, wait: float = 5.0):
  """Every process sees the same local workdir (no-op for one process or a remote workdir)."""
  if jax.process_count() == 1 or paths.is_remote(workdir):
    return
  from jax.experimental import multihost_utils
  paths.makedirs(workdir)
  token = int(multihost_utils.broadcast_one_to_all(np.int32(np.random.default_rng().integers(1 << 30))))
  run = paths.join(workdir, layout.HOST_MARKERS, str(token))
  paths.makedirs(run)
  mine = paths.join(run, f'process_{jax.process_index()}')
  paths.write_atomic(mine, f'{jax.process_index()} {os.uname().nodename}\n')
  multihost_utils.sync_global_devices('vlp_workdir_markers_written')
  missing = []
  if jax.process_index() == 0:
    deadline = time.time() + wait  # a shared file system may show others' files a little late
    while True:
      missing = [i for i in range(jax.process_count()) if not paths.exists(paths.join(run, f'process_{i}'))]
      if not missing or time.time() > deadline:
        break
      time.sleep(0.2)
  n_missing = int(multihost_utils.broadcast_one_to_all(np.int32(len(missing))))
  try:
    paths.remove(mine)
  except OSError:
    pass
  multihost_utils.sync_global_devices('vlp_workdir_markers_read')
  if jax.process_index() == 0:
    try:
      paths.remove(paths.join(workdir, layout.HOST_MARKERS))
    except OSError:
      pass
  if n_missing:
    which = f' (process 0 does not see the markers of process(es) {missing})' if missing else ''
    raise ConfigError(f'workdir {workdir} is not shared between the hosts{which}: use a gs:// workdir or a '
                      f'shared file system mounted at the same path on every host')


def prepare(config, workdir: str):
  """All of the above, in order; returns the compilation cache directory (or None)."""
  check_reachable(config, workdir)
  check_shared(workdir)
  return compile_cache.enable(config, workdir)
