"""XLA and libtpu flags from the config (`config.compiler`), set before the JAX backend starts.

  config.compiler = dict(defaults='auto', tpu=(...), gpu=(...), cpu=(...))

Each platform's flags are '--name=value' strings. The TPU compiler's go to LIBTPU_INIT_ARGS,
which libtpu alone reads: a CPU or GPU run, or a machine without TPUs that has libtpu
installed, never sees them. A GPU or CPU run's go to XLA_FLAGS, which every XLA backend of
the process parses, and which aborts the process on a flag it does not know (a TPU flag
among them would): so only the run's platform's section is set there. `defaults='auto'`
adds vlp's defaults for the platform and mesh (DEFAULTS, each measured with `vlp compile`);
a flag the config names replaces a default of the same name. `vlp train`, `vlp eval`,
`vlp bench` and `vlp compile` apply the flags (`apply`) before anything touches a device:
XLA and libtpu read them once, when the backend starts.
"""
import importlib.util
import os
import re
import shlex

PLATFORMS = ('tpu', 'gpu', 'cpu')
ENV = {'tpu': 'LIBTPU_INIT_ARGS', 'gpu': 'XLA_FLAGS', 'cpu': 'XLA_FLAGS'}
FLAG = re.compile(r'--([A-Za-z][A-Za-z0-9_]*)=(\S+)')

# MaxText's flags for FSDP on TPU that `vlp compile` shows to help (its benchmarks/xla_flags_library.py:
# all-gathers preferred to all-reduces, async, fused with compute). Without them the TPU compiler
# "gathers" FSDP weights by all-reducing zero-padded shards: align_l16 cut to 3 blocks a tower on
# v5p-256 (fsdp=128) sends 993 MiB a device a step over its links, 1.68x the ideal FSDP volume;
# with them 650 MiB (1.10x), every weight gather an all-gather, and 259 -> 196 MiB a device. Each of
# the three is needed (any one left out: 993 MiB). MaxText's reduce-scatter layout flags
# (xla_tpu_use_minor_sharding_for_major_trivial_input, xla_tpu_relayout_group_size_threshold_for_
# reduce_scatter=1, xla_tpu_assign_all_reduce_scatter_layout) changed nothing there, with these three
# or without: left out (docs/results.md, log-pod-programs, has each flag's numbers).
FSDP_TPU = (
    '--xla_tpu_prefer_async_allgather_to_allreduce=true',
    '--xla_enable_async_all_gather=true',
    '--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true',
)


def tpu_only(flag: str) -> bool:
  """A flag of the TPU compiler, which only libtpu knows: XLA_FLAGS must not hold it."""
  name = _name(flag) or ''
  return name.startswith('xla_tpu_') or name in _by_name(FSDP_TPU)


def _fsdp(mesh) -> bool:
  """The mesh shards weights over fsdp (-1 takes the devices left: FSDP whenever there are several)."""
  return mesh['fsdp'] != 1


# (platform, does the mesh want them, flags)
DEFAULTS = (('tpu', _fsdp, FSDP_TPU),)


def defaults(config, platform: str) -> tuple:
  """vlp's default flags for the platform and the config's mesh."""
  if config.compiler.defaults == 'none':
    return ()
  return tuple(f for p, wanted, flags in DEFAULTS if p == platform and wanted(config.mesh) for f in flags)


def _by_name(flags) -> dict:
  return {FLAG.fullmatch(f).group(1): f for f in flags}


def flags(config, platform: str) -> tuple:
  """The flags a run on `platform` gets: the defaults, then the config's (a flag of the same
  name replaces the default)."""
  return tuple({**_by_name(defaults(config, platform)), **_by_name(config.compiler[platform])}.values())


def platform(env=None) -> str:
  """The platform a run will start on, before its backend starts: JAX_PLATFORMS' first entry,
  else TPU where libtpu is installed, GPU where a CUDA or ROCm plugin is, else CPU."""
  env = os.environ if env is None else env
  first = env.get('JAX_PLATFORMS', '').split(',')[0].strip().lower()
  if first:
    return {'cuda': 'gpu', 'rocm': 'gpu'}.get(first, first)
  if importlib.util.find_spec('libtpu') is not None:
    return 'tpu'
  gpu = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin')
  return 'gpu' if any(importlib.util.find_spec(p) is not None for p in gpu) else 'cpu'


def _name(token: str) -> str | None:
  m = FLAG.fullmatch(token)
  return m.group(1) if m else None


def merged(current: str, flags) -> str:
  """An environment variable's flags with `flags` set: a flag of the same name is replaced,
  everything else kept in its place."""
  names = _by_name(flags)
  return ' '.join([t for t in shlex.split(current or '') if _name(t) not in names] + list(flags))


def apply(config, target: str | None = None, env=None) -> dict:
  """Sets the flags of the run's platform (`target`, default: platform()) in its environment
  variable; returns {'platform', 'variable', 'flags', 'defaults'}. Call it before anything
  starts a JAX backend: XLA and libtpu read their flags once per process."""
  env = os.environ if env is None else env
  target = target or platform(env)
  chosen = flags(config, target)
  if chosen:
    env[ENV[target]] = merged(env.get(ENV[target], ''), chosen)
  return {'platform': target, 'variable': ENV[target], 'flags': list(chosen),
          'defaults': list(defaults(config, target))}
