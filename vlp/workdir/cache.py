"""XLA's persistent compilation cache, so a relaunch (after a preemption, a crash, a new
--step) loads its compiled steps instead of compiling them again.

`config.compile_cache`: 'workdir' (the default) puts it at WORKDIR/compile_cache, any other
value is the cache's path (gs:// too: JAX writes it through etils.epath), '' turns it off.
Every compilation is kept (no minimum compile time), so the eval and export functions are too.
"""
import jax

from vlp.core import paths
from vlp.workdir import layout


def cache_dir(config, workdir: str) -> str | None:
  value = config.get('compile_cache', 'workdir')
  if not value:
    return None
  return paths.join(paths.abspath(workdir), layout.COMPILE_CACHE) if value == 'workdir' else paths.abspath(value)


def enable(config, workdir: str) -> str | None:
  """Points JAX's persistent cache at the config's directory (or leaves it off); returns it."""
  path = cache_dir(config, workdir)
  if path is None:
    return None
  if not paths.is_remote(path):
    paths.makedirs(path)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  try:  # the cache is set up at the first compilation: one made before this must not keep it off
    from jax._src import compilation_cache
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass
  return path
