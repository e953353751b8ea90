"""Multi-host start-up: `jax.distributed.initialize` whenever the job spans several processes.

Where the process group comes from, first match wins:
  1. explicit: `--coordinator/--num_processes/--process_id` flags, or the
     VLP_COORDINATOR / VLP_NUM_PROCESSES / VLP_PROCESS_ID variables
     (launch/multiprocess_cpu.sh);
  2. SLURM with more than one task (launch/gpu_slurm.sbatch): JAX's SLURM
     detection gives coordinator, count and rank. With one task per node each
     process takes all of its node's GPUs; with several tasks per node that all
     see the node's GPUs (--gpus-per-node), each takes the GPU of its local rank
     (`local_device_ids=[SLURM_LOCALID]`); a task whose CUDA_VISIBLE_DEVICES holds
     one GPU takes that one;
  3. Cloud TPU on GKE (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES with
     several workers) and TPU VMs made with gcloud (libtpu installed and the GCE
     metadata server lists several `worker-network-endpoints`): JAX's own
     cluster detection, so initialize() is called with no arguments;
  4. otherwise one process: nothing to initialize.
On CPU, cross-process collectives go through gloo.
"""
import importlib.util
import json
import os
import urllib.request

import jax
import numpy as np

from vlp.core.config import ConfigError

METADATA = 'http://{host}/computeMetadata/v1/instance/attributes/{key}'


def gce_metadata(key: str, env=None, timeout: float = 5.0) -> str | None:
  """An instance attribute from the GCE metadata server (what JAX's TPU detection reads), or None."""
  env = os.environ if env is None else env
  url = METADATA.format(host=env.get('GCE_METADATA_IP', 'metadata.google.internal'), key=key)
  try:
    req = urllib.request.Request(url, headers={'Metadata-Flavor': 'Google'})
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.read().decode()
  except OSError:
    return None


def tpu_vm_workers(env=None, metadata=gce_metadata) -> int:
  """How many hosts the TPU slice of this VM has (0: not a Cloud TPU VM made with gcloud)."""
  env = os.environ if env is None else env
  if 'TPU_SKIP_MDS_QUERY' in env or importlib.util.find_spec('libtpu') is None and 'TPU_ACCELERATOR_TYPE' not in env:
    return 0
  if metadata('agent-worker-number', env) is None:
    return 0
  endpoints = metadata('worker-network-endpoints', env) or ''
  return len([w for w in endpoints.split(',') if w.strip()])


def _count(value: str) -> int:
  return len([h for h in (value or '').split(',') if h.strip()])


def _tasks_per_node(env) -> int:
  if env.get('SLURM_NTASKS_PER_NODE'):
    return int(env['SLURM_NTASKS_PER_NODE'])
  first = (env.get('SLURM_TASKS_PER_NODE') or '1').split(',')[0]  # e.g. '8(x2)'
  return int(first.split('(')[0])


def resolve(coordinator=None, num_processes=None, process_id=None, env=None, tpu_workers=None) -> dict | None:
  """The keyword arguments for jax.distributed.initialize ({} for JAX's auto-detection), None for one process.
  tpu_workers: env -> the TPU VM slice's host count (tests pass a fake; default asks the metadata server)."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get('VLP_COORDINATOR')
  num_processes = num_processes if num_processes is not None else env.get('VLP_NUM_PROCESSES')
  process_id = process_id if process_id is not None else env.get('VLP_PROCESS_ID')
  if coordinator or num_processes is not None or process_id is not None:
    if not (coordinator and num_processes is not None and process_id is not None):
      raise ConfigError('multi-process needs all of --coordinator, --num_processes and --process_id '
                        '(or VLP_COORDINATOR, VLP_NUM_PROCESSES, VLP_PROCESS_ID)')
    return {'coordinator_address': coordinator, 'num_processes': int(num_processes),
            'process_id': int(process_id)}
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
    if _tasks_per_node(env) > 1 and len(visible) != 1 and 'SLURM_LOCALID' in env:
      return {'local_device_ids': [int(env['SLURM_LOCALID'])]}  # tasks share the node's GPUs: one each
    return {}
  if _count(env.get('TPU_WORKER_HOSTNAMES', '')) > 1 or _count(env.get('TPU_PROCESS_ADDRESSES', '')) > 1:
    return {}  # GKE
  if (tpu_workers or tpu_vm_workers)(env) > 1:
    return {}  # a TPU VM slice made with gcloud: JAX reads the metadata server
  return None


def initialize(coordinator=None, num_processes=None, process_id=None, env=None):
  """Joins the process group (see the module docstring); returns the arguments used, or None."""
  kwargs = resolve(coordinator, num_processes, process_id, env)
  if kwargs is None:
    return None
  # Must precede backend initialisation; harmless where the backend is not CPU.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  return kwargs


def json_agree(gather):
  """agree() from gather(uint8 [k]) -> [hosts, k] (the same k on every host, as
  multihost_utils.process_allgather wants): agree({int: JSON value}) gives every host's
  entries merged (eval: {image index: reason}; a checkpoint restore: {process: why})."""

  def agree(bad: dict) -> dict:
    blob = json.dumps({str(k): v for k, v in bad.items()}).encode()
    size = int(np.max(gather(np.asarray([len(blob)], np.int32))))
    rows = gather(np.frombuffer(blob.ljust(size), np.uint8))  # JSON allows trailing spaces
    out = {}
    for row in np.asarray(rows).reshape(-1, size):
      out.update({int(k): v for k, v in json.loads(bytes(row).decode()).items()})
    return out

  return agree


def first_failure(why: str | None) -> tuple[str | None, int | None]:
  """Every process's verdict on one thing (why: None where it went well here): (None, None) where
  it went well everywhere, else (the first failing process's why, its index); the index is None
  with one process, or where every process failed alike (e.g. on a verdict they had agreed)."""
  if jax.process_count() == 1:
    return why, None
  from jax.experimental import multihost_utils
  bad = json_agree(multihost_utils.process_allgather)({jax.process_index(): why} if why else {})
  if not bad or (len(bad) == jax.process_count() and len(set(bad.values())) == 1):
    return (bad[min(bad)] if bad else None), None
  return bad[min(bad)], min(bad)
