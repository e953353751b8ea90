"""vlp.core.host_memory: a CPU run of the `vlp` command keeps the memory XLA frees, so its steps stop
mapping their temporaries in again (counted as page faults, not timed)."""
import json
import os
import subprocess
import sys

import pytest

from vlp.core import host_memory

ROOT = os.path.join(os.path.dirname(__file__), '..')
GLIBC_LINUX = sys.platform == 'linux' and host_memory.platform.libc_ver()[0] == 'glibc'


@pytest.mark.skipif(not GLIBC_LINUX, reason='the settings are glibc malloc\'s')
def test_wanted_on_the_cpu_unless_set_or_opted_out():
  assert host_memory.wanted({'JAX_PLATFORMS': 'cpu'})
  assert not host_memory.wanted({'JAX_PLATFORMS': 'tpu'})
  assert not host_memory.wanted({'JAX_PLATFORMS': 'cuda,cpu'})
  assert not host_memory.wanted({'JAX_PLATFORMS': 'cpu', 'VLP_KEEP_FREED_MEMORY': '0'})
  assert not host_memory.wanted({'JAX_PLATFORMS': 'cpu', 'MALLOC_ARENA_MAX': '4'})  # the user's own choice
  assert not host_memory.wanted({'JAX_PLATFORMS': 'cpu', **host_memory.SETTINGS})  # after the restart


def test_an_attached_accelerator_leaves_the_allocator_alone(monkeypatch):
  monkeypatch.setattr(host_memory.glob, 'glob', lambda pattern: ['/dev/accel0'] if 'accel' in pattern else [])
  assert not host_memory.on_cpu({})
  monkeypatch.setattr(host_memory.glob, 'glob', lambda pattern: [])
  assert host_memory.on_cpu({})


def _bench(env_extra):
  env = {k: v for k, v in os.environ.items() if k not in host_memory.SETTINGS}  # as a fresh shell has them
  env.update(env_extra, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  proc = subprocess.run([sys.executable, '-m', 'vlp.cli', 'bench', 'step', '--config=configs/bench_tiny.py',
                         '--steps=5', '--warmup=2', '--config.batch_size=32'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC_LINUX, reason='the settings are glibc malloc\'s')
def test_the_command_keeps_freed_memory_between_steps():
  """bench_tiny at batch 32 frees about 360 MB of temporaries a step: opted out, the next step
  faults them in again (about 90,000 pages); kept, it reuses them. The median step's faults: in
  its first steps a kept run may still grow its arena (one run of 2 measured steps averaged
  42,780 faults a step kept, 86,232 opted out)."""
  opted_out = _bench({'VLP_KEEP_FREED_MEMORY': '0'})['page_faults_per_step']
  kept = _bench({})['page_faults_per_step']
  print(f'page faults a step: {opted_out:.0f} opted out, {kept:.0f} kept')
  assert opted_out > 20_000
  assert kept < 0.02 * opted_out
