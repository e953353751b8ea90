"""`vlp bench step`: examples/s, step time, MFU and compile time of the train step.

The batch is random and already on device, so this measures the step alone
(the input pipeline has its own benchmark). MFU = analytic model FLOPs per
second over the fp32 matmul peak measured on the same machine by JAX (on a GPU
of vlp.bench.peak's table, its datasheet bf16 peak). `profile_dir`: the timed
steps run under `jax.profiler.trace` and the result gains their device time by
op category (vlp.bench.op_profile); on a GPU it also has the peak device memory.

A config with several tasks has one step per (task, resolution): each is
compiled and timed on its own (`tasks` in the result), and the totals weight
them by their share of the schedule's steps.
"""
import collections
import contextlib
import os
import resource
import time

import jax
import numpy as np

from vlp import plan as plan_lib
from vlp.bench import op_profile, peak
from vlp.core import parallel
from vlp.train import agd, state as state_lib, step as step_lib



def mfu(train_flops_per_step: float, step_seconds: float, peak_flops_per_sec: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
  return train_flops_per_step / step_seconds / peak_flops_per_sec

def random_batch(plan, mesh, variant, seed=0):
  """Random inputs of the shapes of a variant's batch (the recipe's batch spec), sharded
  over the batch axes."""
  batch = plan.random_batch(variant, np.random.default_rng(seed))
  return jax.device_put(batch, parallel.batch_sharding(mesh))


def _page_faults() -> int:
  """Minor page faults of this process so far: memory the kernel had to map in and zero."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _time_steps(train_step, state, batch, steps, warmup, trace_dir=None):
  """(state, median seconds a step, median page faults a step) over `steps` steps after `warmup`.
  Medians both: a noisy neighbour slows some steps, and a step in which the allocator still grows
  its arena faults its new pages in once."""
  for _ in range(warmup):
    state, _ = train_step(state, batch)
  jax.block_until_ready(state)
  times, faults = [], []
  # create_perfetto_trace: a Chrome trace (vlp.bench.op_profile reads it) whatever the profiler writes besides
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True) if trace_dir else contextlib.nullcontext():
    for _ in range(steps):  # one by one
      t, f = time.perf_counter(), _page_faults()
      state, m = train_step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
      faults.append(_page_faults() - f)
    jax.block_until_ready(state)
  return state, float(np.median(times)), float(np.median(faults))


def peak_memory_gib():
  """The most memory a device has held (GPU, TPU), in GiB; None where the backend keeps no count."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats['peak_bytes_in_use'] / 2 ** 30 if 'peak_bytes_in_use' in stats else None


def schedule_shares(plan, steps: int = 10_000) -> dict[str, float]:
  """Share of the schedule's steps that each variant gets (over its first `steps` steps)."""
  schedule = agd.Schedule(plan)
  counts = collections.Counter(plan.variants[schedule(s)].name for s in range(steps))
  return {v.name: counts[v.name] / steps for v in plan.variants}


def run(config, steps: int = 20, warmup: int = 3, peak_flops: float | None = None,
        profile_dir: str | None = None) -> dict:
  """`profile_dir`: trace the timed steps there (several variants: a folder each) and add
  'profile', their device time by op category."""
  plan = plan_lib.make(config, jax.device_count(), jax.process_count())
  mesh = parallel.make_mesh(plan.sizes)
  setup = state_lib.make_setup(plan, mesh)
  state = state_lib.init_state(plan, setup)
  peak_flops, peak_source = (peak_flops, 'given') if peak_flops else peak.step_peak()
  per_variant = {}
  for v in plan.variants:
    train_step, compile_s = step_lib.compile_train_step(plan, setup, v)
    trace_dir = profile_dir and (profile_dir if len(plan.variants) == 1 else os.path.join(profile_dir, v.name))
    state, step_s, faults = _time_steps(train_step, state, random_batch(plan, mesh, v), steps, warmup, trace_dir)
    model_flops = plan.recipe.train_flops(config, v)
    per_variant[v.name] = {
        'examples_per_sec': v.batch_size / step_s,
        'step_ms': 1e3 * step_s,
        'mfu': mfu(model_flops, step_s, peak_flops),
        'compile_s': compile_s,
        'model_tflops_per_step': model_flops / 1e12,
        'batch_size': v.batch_size,
        # on the CPU, pages of the step's temporaries mapped in again each step (vlp.core.host_memory)
        'page_faults_per_step': faults,
    }
    if trace_dir:
      per_variant[v.name]['profile'] = op_profile.breakdown(trace_dir, train_step.as_text(), steps)
  result = {'devices': jax.device_count(), 'peak_tflops': peak_flops / 1e12, 'peak_source': peak_source,
            'peak_memory_gib': peak_memory_gib()}
  if len(plan.variants) == 1:
    return {**per_variant[plan.variants[0].name], **result}
  # a step of the schedule on average: its variants weighted by their share of steps
  shares = schedule_shares(plan)
  step_s = sum(shares[n] * r['step_ms'] / 1e3 for n, r in per_variant.items())
  mean = lambda k: sum(shares[n] * r[k] for n, r in per_variant.items())
  return {
      'examples_per_sec': mean('batch_size') / step_s,
      'page_faults_per_step': mean('page_faults_per_step'),
      'step_ms': 1e3 * step_s,
      'mfu': mean('model_tflops_per_step') * 1e12 / step_s / peak_flops,
      'compile_s': sum(r['compile_s'] for r in per_variant.values()),
      'model_tflops_per_step': mean('model_tflops_per_step'),
      'tasks': {n: {**r, 'share': shares[n]} for n, r in per_variant.items()},
      **result,
  }


def moe_sections(model_cfg) -> list:
  """The sections of the model config that hold a Mixture-of-Experts setting (its towers)."""
  return [s for s in model_cfg.values() if hasattr(s, 'get') and s.get('moe') is not None]


def dense_twin(config):
  """The same config with every Mixture-of-Experts block dense (the MLP of one expert)."""
  dense = config.copy_and_resolve_references()
  for section in moe_sections(dense.model):
    section.moe.num_experts = 0
  return dense


def compare_dense(moe_result: dict, dense_result: dict) -> dict:
  """Step-time ratios MoE / dense per task and overall, with the model FLOPs ratio beside."""
  def ratios(a, b):
    return {'step_time_ratio': a['step_ms'] / b['step_ms'],
            'flops_ratio': a['model_tflops_per_step'] / b['model_tflops_per_step'],
            'moe_step_ms': a['step_ms'], 'dense_step_ms': b['step_ms'],
            'moe_compile_s': a['compile_s'], 'dense_compile_s': b['compile_s']}
  out = ratios(moe_result, dense_result)
  if 'tasks' in moe_result:
    out['tasks'] = {n: ratios(r, dense_result['tasks'][n]) for n, r in moe_result['tasks'].items()}
  return out
