"""Everything a workdir holds, by name; one place, so that a reader (eval, export, plot,
TensorBoard) and the trainer agree.

  config.json            the run's config (vlp.workdir.identity)
  checkpoints/<step>/    Orbax: the train state and the input positions (vlp.checkpoint)
  checkpoints_corrupt/   steps that did not restore, set aside for a post-mortem
  metrics.jsonl, tb/     the metrics, as JSON lines and TensorBoard events (vlp.workdir.metrics)
  profile/               traces of config.profile.steps (vlp.train.profile)
  compile_cache/         XLA's persistent compilation cache (vlp.workdir.cache)
  eval_<step>.json       `vlp eval`'s results; metrics.png: `vlp plot`'s
  .vlp_hosts/            markers of the shared-disk check, removed after it (vlp.workdir.hosts)
"""
import jax

from vlp.core import paths

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
CORRUPT = 'checkpoints_corrupt'
METRICS = 'metrics.jsonl'
TENSORBOARD = 'tb'
PROFILE = 'profile'
COMPILE_CACHE = 'compile_cache'
PLOT = 'metrics.png'
HOST_MARKERS = '.vlp_hosts'


def path(workdir: str, name: str) -> str:
  return paths.join(workdir, name)


def eval_results(workdir: str, step: int) -> str:
  return paths.join(workdir, f'eval_{step}.json')


def profile_dir(workdir: str) -> str:
  """Where this process writes its trace: jax.profiler traces the calling process only and names
  its files by host, so processes sharing a host would overwrite each other's without a folder each."""
  root = paths.join(workdir, PROFILE)
  return root if jax.process_count() == 1 else paths.join(root, f'process_{jax.process_index()}')
