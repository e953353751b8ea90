"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Where the process group comes from, first match wins:
  1. explicit: `--coordinator/--num_processes/--process_id` flags, or the
     VLP_COORDINATOR / VLP_NUM_PROCESSES / VLP_PROCESS_ID variables
     (launch/multiprocess_cpu.sh);
  2. SLURM (SLURM_JOB_ID with more than one task, launch/gpu_slurm.sbatch) and
     Cloud TPU pods (TPU_WORKER_HOSTNAMES with several workers): JAX's own
     cluster detection reads them, so initialize() is called with no arguments;
  3. otherwise a single process: nothing to initialize.
On CPU, cross-process collectives go through gloo.
"""
import os

import jax

from vlp.config import ConfigError


def resolve(coordinator=None, num_processes=None, process_id=None, env=None) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, {} for auto-detection, None for one process."""
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
    return {}
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return {}
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
