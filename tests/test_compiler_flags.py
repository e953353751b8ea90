"""config.compiler: XLA and libtpu flags per platform (vlp.core.compiler_flags), checked before
anything is built, set in the environment before the backend starts, shown by `vlp compile`."""
import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_config

from vlp import plan as plan_lib
from vlp.compile import target
from vlp.core import compiler_flags, config_files
from vlp.core.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP = ['mesh.fsdp=-1', 'mesh.data=1']


def _config(*overrides):
  return config_files.apply_overrides(tiny_config(), list(overrides))


def test_fsdp_on_tpu_gets_the_defaults_and_a_config_flag_replaces_one_of_them():
  assert compiler_flags.flags(_config(*FSDP), 'tpu') == compiler_flags.FSDP_TPU
  assert compiler_flags.flags(_config(), 'tpu') == ()  # data parallel: no weights to gather
  assert compiler_flags.flags(_config(*FSDP), 'gpu') == ()
  assert compiler_flags.flags(_config(*FSDP, 'compiler.defaults=none'), 'tpu') == ()
  mine = ('--xla_enable_async_all_gather=false', '--xla_tpu_enable_latency_hiding_scheduler=true')
  got = compiler_flags.flags(_config(*FSDP, f'compiler.tpu={mine!r}'), 'tpu')
  assert len(got) == len(compiler_flags.FSDP_TPU) + 1 and set(mine) <= set(got)
  assert '--xla_enable_async_all_gather=true' not in got


def test_tpu_flags_go_to_libtpu_alone_and_keep_what_the_environment_had():
  config = _config(*FSDP, "compiler.cpu=('--xla_cpu_enable_fast_math=false',)")
  env = {'LIBTPU_INIT_ARGS': '--xla_enable_async_all_gather=false --xla_tpu_other=1', 'XLA_FLAGS': '--a=1'}
  got = compiler_flags.apply(config, 'tpu', env)
  assert got['variable'] == 'LIBTPU_INIT_ARGS' and got['flags'] == list(compiler_flags.FSDP_TPU)
  tokens = env['LIBTPU_INIT_ARGS'].split()
  assert tokens[0] == '--xla_tpu_other=1' and tokens[1:] == list(compiler_flags.FSDP_TPU)  # replaced by name
  assert env['XLA_FLAGS'] == '--a=1'  # the CPU section is a CPU run's
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  compiler_flags.apply(config, 'cpu', env)
  assert env == {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false'}


@pytest.mark.parametrize('value,platform', [('cpu', 'cpu'), ('tpu,cpu', 'tpu'), ('cuda', 'gpu'), ('rocm', 'gpu')])
def test_the_platform_is_known_before_the_backend_starts(value, platform):
  assert compiler_flags.platform({'JAX_PLATFORMS': value}) == platform


@pytest.mark.parametrize('override,key', [
    ("compiler.tpu=('xla_tpu_x=1',)", 'compiler.tpu'),  # no leading --
    ("compiler.tpu=('--xla_tpu_x',)", 'compiler.tpu'),  # no value
    ("compiler.gpu=('--xla_tpu_enable_latency_hiding_scheduler=true',)", 'compiler.gpu'),  # XLA_FLAGS would abort
    ("compiler.cpu=('--xla_enable_async_all_gather=true',)", 'compiler.cpu'),  # a libtpu default's name
    ('compiler.defaults=always', 'compiler.defaults'),
])
def test_bad_flags_are_one_error_naming_the_key(override, key):
  with pytest.raises(ConfigError, match=f"'{key}'"):
    plan_lib.make(_config(override), 8)


def test_a_cpu_run_starts_with_the_tpu_defaults_set():
  """The defaults land in LIBTPU_INIT_ARGS whatever the platform: a CPU process (one that may
  load libtpu first, as JAX does where it is installed) computes as before."""
  env = dict(os.environ, LIBTPU_INIT_ARGS=' '.join(compiler_flags.FSDP_TPU))
  env.pop('JAX_PLATFORMS', None)
  proc = subprocess.run([sys.executable, '-c', 'import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))'],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith('6.0'), proc.stderr[-2000:]


@pytest.mark.skipif(not target.have_libtpu(), reason='libtpu not installed')
def test_vlp_compile_sets_the_flags_before_libtpu_starts_and_records_them(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop(target.DUMP_ENV, None)
  env.pop('LIBTPU_INIT_ARGS', None)
  out = tmp_path / 'rec.json'
  proc = subprocess.run([sys.executable, '-m', 'vlp.cli', 'compile', '--config=tests/tiny.py', '--topology=v5e:2x2',
                         '--no_eval', f'--json={out}', '--config.mesh.fsdp=-1', '--config.mesh.data=1',
                         '--config.model.image.depth=1', '--config.model.text.depth=1'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rec = json.loads(out.read_text())['compiler']
  assert rec['flags'] == list(compiler_flags.FSDP_TPU) == rec['defaults'] and rec['not_in_effect'] == []
  assert f'compiler flags (config.compiler, in LIBTPU_INIT_ARGS; {len(compiler_flags.FSDP_TPU)} of them' in proc.stdout
