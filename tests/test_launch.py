"""launch/ scripts: each --dry-run prints the commands it would run."""
import os
import shlex
import subprocess

import pytest

from vlp import distributed
from vlp.config import ConfigError

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'launch')
TRAIN = ['--config=configs/align_tiny.py', '--workdir=/tmp/run', '--config.total_steps=5']


def dry_run(script, *args):
  out = subprocess.run(['bash', os.path.join(LAUNCH, script), '--dry-run', *args], check=True,
                       capture_output=True, text=True, env={**os.environ, 'PYTHON': 'python3'}).stdout
  return [shlex.split(line) for line in out.strip().splitlines()]


def test_local():
  assert dry_run('local.sh', *TRAIN) == [['python3', '-m', 'vlp.cli', 'train', *TRAIN]]


def test_multiprocess_cpu():
  lines = dry_run('multiprocess_cpu.sh', '--processes=3', '--devices=2', '--port=4321', *TRAIN)
  assert lines == [['env', 'JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=2',
                    'python3', '-m', 'vlp.cli', 'train', '--coordinator=localhost:4321', '--num_processes=3',
                    f'--process_id={i}', *TRAIN] for i in range(3)]


def test_tpu_pod():
  lines = dry_run('tpu_pod.sh', '--name=pod1', '--zone=us-central2-b', '--accelerator=v4-32', *TRAIN)
  tpu, where = ['gcloud', 'compute', 'tpus', 'tpu-vm'], '--zone=us-central2-b'
  assert lines[0] == [*tpu, 'create', 'pod1', where, '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']
  assert lines[1][:3] == ['git', '-C', f'{LAUNCH}/..'] and lines[1][3] == 'archive'
  assert lines[2] == [*tpu, 'scp', '/tmp/vlp-pod1.tar.gz', 'pod1:vlp.tar.gz', where, '--worker=all']
  assert lines[3][:8] == [*tpu, 'ssh', 'pod1', where, '--worker=all'] and 'pip install' in lines[3][8]
  assert lines[4][:8] == [*tpu, 'ssh', 'pod1', where, '--worker=all']
  assert shlex.split(lines[4][8].removeprefix('--command=')) == [
      'cd', 'vlp', '&&', 'python3', '-m', 'vlp.cli', 'train', '--no_progress', *TRAIN]
  assert lines[5] == [*tpu, 'delete', 'pod1', where, '--quiet']
  assert len(dry_run('tpu_pod.sh', '--name=pod1', '--zone=z', '--accelerator=v4-8', '--keep', *TRAIN)) == 5


def test_gpu_slurm():
  assert dry_run('gpu_slurm.sbatch', *TRAIN) == [
      ['srun', '--kill-on-bad-exit=1', 'python3', '-m', 'vlp.cli', 'train', '--no_progress', *TRAIN]]
  with open(os.path.join(LAUNCH, 'gpu_slurm.sbatch')) as f:
    assert '#SBATCH --signal=TERM@120' in f.read()  # preemption notice: vlp saves and exits 0


def test_process_group_from_flags_env_slurm_tpu():
  assert distributed.resolve(env={}) is None  # one process
  explicit = {'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 1}
  assert distributed.resolve('h:1', 2, 1, env={}) == explicit
  assert distributed.resolve(env={'VLP_COORDINATOR': 'h:1', 'VLP_NUM_PROCESSES': '2', 'VLP_PROCESS_ID': '1'}) == explicit
  assert distributed.resolve(env={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16'}) == {}  # JAX reads SLURM
  assert distributed.resolve(env={'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert distributed.resolve(env={'TPU_WORKER_HOSTNAMES': 'a,b,c,d'}) == {}  # JAX reads the TPU metadata
  with pytest.raises(ConfigError, match='needs all of'):
    distributed.resolve(num_processes=2, env={})
