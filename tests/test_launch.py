"""launch/ scripts: each --dry-run prints the commands it would run."""
import importlib.util
import os
import shlex
import subprocess

import pytest

from vlp.core import distributed
from vlp.core.config import ConfigError

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


GS_TRAIN = ['--config=configs/align_tiny.py', '--workdir=gs://bucket/run', '--config.total_steps=5']


def test_tpu_pod():
  lines = dry_run('tpu_pod.sh', '--name=pod1', '--zone=us-central2-b', '--accelerator=v4-32', *GS_TRAIN)
  tpu, where = ['gcloud', 'compute', 'tpus', 'tpu-vm'], '--zone=us-central2-b'
  assert lines[0] == [*tpu, 'create', 'pod1', where, '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']
  assert lines[1][:3] == ['git', '-C', f'{LAUNCH}/..'] and lines[1][3] == 'archive'
  assert lines[2] == [*tpu, 'scp', '/tmp/vlp-pod1.tar.gz', 'pod1:vlp.tar.gz', where, '--worker=all']
  install = lines[3][8]
  assert lines[3][:8] == [*tpu, 'ssh', 'pod1', where, '--worker=all']
  assert 'python3.11 -m venv vlp-venv' in install and "pip install -q -e 'vlp[tpu]'" in install
  start = lines[4][8]
  assert lines[4][:8] == [*tpu, 'ssh', 'pod1', where, '--worker=all']
  assert 'lsof -t /dev/accel*' in start and 'xargs -r sudo kill -9' in start  # stale TPU holders
  assert 'setsid nohup' in start and '> ../vlp-train.log' in start  # detached, one log per worker
  assert '../vlp-venv/bin/python -m vlp.cli train --no_progress ' + ' '.join(GS_TRAIN) in start
  assert 'vlp-train.exit' in lines[5][8] and 'preempted' in lines[5][8]  # the watch: relaunch until done
  assert len(lines) == 6  # not deleted unless asked
  deleted = dry_run('tpu_pod.sh', '--name=pod1', '--zone=z', '--accelerator=v4-32', '--delete', *GS_TRAIN)
  assert deleted[-1] == [*tpu, 'delete', 'pod1', '--zone=z', '--quiet']


@pytest.mark.parametrize('acc,version', [('v4-8', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                         ('v5p-32', 'v2-alpha-tpuv5'), ('v6e-16', 'v2-alpha-tpuv6e')])
def test_tpu_pod_runtime_version_per_generation(acc, version):
  lines = dry_run('tpu_pod.sh', '--name=p', '--zone=z', f'--accelerator={acc}', *GS_TRAIN)
  assert lines[0][-1] == f'--version={version}'


def test_tpu_pod_queued_resource_and_spot():
  lines = dry_run('tpu_pod.sh', '--name=p', '--zone=z', '--accelerator=v6e-16', '--queued', '--spot', '--delete', *GS_TRAIN)
  qr = ['gcloud', 'compute', 'tpus', 'queued-resources']
  assert lines[0] == [*qr, 'create', 'p', '--node-id=p', '--zone=z', '--accelerator-type=v6e-16',
                      '--runtime-version=v2-alpha-tpuv6e', '--spot']
  assert lines[-1] == [*qr, 'delete', 'p', '--zone=z', '--force', '--quiet']


def test_tpu_pod_multi_host_needs_a_gcs_workdir():
  r = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_pod.sh'), '--dry-run', '--name=p', '--zone=z',
                      '--accelerator=v4-32', *TRAIN], capture_output=True, text=True)
  assert r.returncode == 2 and r.stdout == ''
  assert r.stderr.strip() == ('tpu_pod.sh: v4-32 has 4 hosts, which share no disk: use a gs:// workdir '
                              '(got /tmp/run)')
  assert len(dry_run('tpu_pod.sh', '--name=p', '--zone=z', '--accelerator=v4-8', *TRAIN)) == 6  # one host: local is fine


def test_gpu_slurm():
  assert dry_run('gpu_slurm.sbatch', *TRAIN) == [
      ['srun', '--kill-on-bad-exit=1', '--ntasks-per-node=1', 'python3', '-m', 'vlp.cli', 'train', '--no_progress',
       *TRAIN],
      ['scontrol', 'requeue', 'JOBID']]  # after a SIGTERM: the job requeues itself
  with open(os.path.join(LAUNCH, 'gpu_slurm.sbatch')) as f:
    script = f.read()
  assert '#SBATCH --signal=B:TERM@120' in script  # preemption notice to the batch shell: it forwards, then requeues
  assert '#SBATCH --gpus-per-node=8' in script and '#SBATCH --gpus-per-task' not in script


def test_gpu_bench():
  root = os.path.dirname(LAUNCH)
  env = {k: v for k, v in os.environ.items() if k not in ('GPU_VENV', 'BENCH_VENV')}
  out = subprocess.run(['bash', os.path.join(LAUNCH, 'gpu_bench.sh'), '--dry-run', '--gpu=1', '--steps=5', '--profile'],
                       check=True, capture_output=True, text=True, env={**env, 'PYTHON': 'python3'}).stdout
  lines = [shlex.split(line) for line in out.strip().splitlines()]
  venv, bench = f'{root}/.venv-gpu', f'{root}/.venv-bench-gpu'
  assert lines[0] == ['python3', '-m', 'venv', venv]
  assert lines[1] == [f'{venv}/bin/pip', 'install', '-q', '-e', '.[gpu]']  # JAX with CUDA
  # torch with CUDA (PyPI's x86_64 wheels) and open_clip, apart from a CPU-only .venv-bench
  assert lines[2] == ['env', f'VENV={bench}', 'PYTHON=python3', 'bash', 'launch/setup_bench_env.sh', '--full']
  assert lines[3][0] == 'nvidia-smi'
  assert lines[4][:3] == ['env', 'CUDA_VISIBLE_DEVICES=1', f'{venv}/bin/python'] and 'jax.devices()' in lines[4][-1]
  assert lines[5][:3] == ['env', 'CUDA_VISIBLE_DEVICES=1', f'{bench}/bin/python']
  assert 'torch.cuda.is_available()' in lines[5][-1]
  assert lines[6] == ['env', 'CUDA_VISIBLE_DEVICES=1', 'XLA_PYTHON_CLIENT_PREALLOCATE=false',
                      f'VLP_BENCH_PYTHON={bench}/bin/python', f'{venv}/bin/python', '-m', 'vlp.cli', 'bench', 'step',
                      '--config=configs/clip_b16.py:1', '--compare=open_clip', '--steps=5', '--warmup=5', '--profile']
  assert len(lines) == 7
  r = subprocess.run(['bash', os.path.join(LAUNCH, 'gpu_bench.sh'), '--dry-run', '--gpus=2'], capture_output=True,
                     text=True)
  assert r.returncode == 2 and r.stdout == '' and 'unknown argument --gpus=2' in r.stderr


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


def test_process_group_resolution_on_clusters():
  # SLURM: one task per node takes the node's GPUs; several tasks per node one GPU each (local rank)
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '3'}
  assert distributed.resolve(env={**slurm, 'SLURM_NTASKS': '2', 'SLURM_TASKS_PER_NODE': '1(x2)'}) == {}
  assert distributed.resolve(env={**slurm, 'SLURM_TASKS_PER_NODE': '8(x2)'}) == {'local_device_ids': [3]}
  assert distributed.resolve(env={**slurm, 'SLURM_NTASKS_PER_NODE': '8', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}) == {
      'local_device_ids': [3]}
  assert distributed.resolve(env={**slurm, 'SLURM_NTASKS_PER_NODE': '8', 'CUDA_VISIBLE_DEVICES': '3'}) == {}  # bound already
  # GKE TPU: the worker list in the environment
  assert distributed.resolve(env={'TPU_WORKER_HOSTNAMES': 'a'}) is None
  assert distributed.resolve(env={'TPU_PROCESS_ADDRESSES': 'a:1,b:1'}) == {}
  # a TPU VM slice made with gcloud: JAX's GCE metadata detection, asked only where libtpu is
  meta = {'agent-worker-number': '0', 'worker-network-endpoints': 'n0:0:10.0.0.2,n1:1:10.0.0.3,n2:2:10.0.0.4,n3:3:10.0.0.5'}
  fake = lambda key, env: meta.get(key)  # noqa: E731
  tpu_env = {'TPU_ACCELERATOR_TYPE': 'v4-32'}
  assert distributed.tpu_vm_workers(tpu_env, metadata=fake) == 4
  assert distributed.resolve(env=tpu_env, tpu_workers=lambda env: distributed.tpu_vm_workers(env, fake)) == {}
  one = {'agent-worker-number': '0', 'worker-network-endpoints': 'n0:0:10.0.0.2'}
  assert distributed.resolve(env=tpu_env, tpu_workers=lambda env: distributed.tpu_vm_workers(env, lambda k, e: one.get(k))) is None
  assert distributed.tpu_vm_workers({**tpu_env, 'TPU_SKIP_MDS_QUERY': '1'}, metadata=fake) == 0
  if importlib.util.find_spec("libtpu") is None:
    assert distributed.tpu_vm_workers({}, metadata=fake) == 0  # no TPU here: the metadata server is not asked
  # a single host: nothing to initialize
  assert distributed.resolve(env={'HOME': '/root'}, tpu_workers=lambda env: 0) is None
