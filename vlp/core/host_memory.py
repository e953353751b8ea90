"""CPU runs keep the host memory XLA frees, for its next step.

On the CPU backend XLA allocates each step's temporaries (1.43 GB for bench_tiny) with malloc
and frees them when the step ends. glibc serves a request that large with a fresh mmap and
gives it back with munmap, so every step faults those pages in again: 350,000 page faults a
step, and a fifth of bench_tiny's step spent in the kernel zeroing pages. With one malloc
arena, no mmap and no trimming, freed memory stays in the process and the next step reuses
it: no page faults after the first step (docs/results.md).

glibc reads these settings from the environment once, at process start, so the `vlp` command
sets them and starts itself again: on Linux with glibc, when the run is on the CPU (no TPU or
GPU device is attached, or JAX_PLATFORMS=cpu), unless the user set any of them already or
opted out with VLP_KEEP_FREED_MEMORY=0. Processes it starts (input workers, the open_clip
reference of `vlp bench step`) inherit them. On TPUs and GPUs the step's temporaries live in
device memory, and the host's allocator is left as it is.
"""
import glob
import os
import platform
import sys

SETTINGS = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2 ** 62)}
OPT_OUT = 'VLP_KEEP_FREED_MEMORY'
ACCELERATOR_DEVICES = ('/dev/accel[0-9]*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')


def on_cpu(environ) -> bool:
  """Whether this run's JAX backend will be the CPU, known before JAX starts."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def wanted(environ) -> bool:
  return (sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc' and environ.get(OPT_OUT) != '0'
          and not any(key in environ for key in SETTINGS) and on_cpu(environ))


def restart_keeping_freed_memory(argv) -> None:
  """Starts this command again (argv as sys.argv) with SETTINGS, when wanted; else returns."""
  if not wanted(os.environ):
    return
  script = argv[0]
  command = [script] if os.access(script, os.X_OK) and not script.endswith('.py') else [sys.executable, '-m', 'vlp.cli']
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(command[0], command + list(argv[1:]), {**os.environ, **SETTINGS})
