"""Compiling a plan's programs for the topology, and what the compiler says about each.

Train steps come from training's own `compile_train_step` (the same jit, shardings, donation
and activation rules); the eval encoders are the recipe's `predict_fns` for each kind of
`export_encoders`, on the training param shardings, over a batch of the largest evaluator
batch_size split over the batch axes (replicated when it does not divide, as numpy inputs are).
"""
import time

import jax
import jax.numpy as jnp

from vlp.compile import hlo
from vlp.core import parallel
from vlp.eval import embed
from vlp.train import step as step_lib

DEFAULT_EVAL_BATCH = 256  # a config without evaluators: the encoders at this batch


def _refused(e: Exception) -> str | None:
  """The first line of the TPU compiler's refusal of a program that cannot fit, else None."""
  msg = str(e).splitlines()[0] if str(e) else type(e).__name__
  return msg if 'RESOURCE_EXHAUSTED' in msg or 'out of memory' in msg.lower() else None


def compile_program(name: str, fn):
  """Runs fn() -> (compiled, seconds); returns (entry, compiled), compiled None when the
  compiler refused the program for memory (entry['fits'] False, entry['error'] its words)."""
  start = time.perf_counter()
  try:
    compiled, seconds = fn()
  except Exception as e:  # noqa: BLE001 — anything but a memory refusal is raised again
    msg = _refused(e)
    if msg is None:
      raise
    return {'name': name, 'fits': False, 'error': msg, 'compile_s': time.perf_counter() - start}, None
  return {'name': name, 'compile_s': seconds}, compiled


def memory(compiled) -> dict:
  """Per-device bytes of a compiled program; total = args + out - alias (donated) + temp + code."""
  m = compiled.memory_analysis()
  mem = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  mem['total'] = mem['argument'] + mem['output'] - mem['alias'] + mem['temp'] + mem['generated_code']
  return mem


def cost(compiled, program) -> dict:
  """XLA's FLOPs and bytes accessed per device, with the loop trips its analysis leaves out
  (a scan's body counts once there: hlo.loop_trips_cost of the program's optimized HLO, its
  text or its hlo.Program)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  extra = hlo.loop_trips_cost(program)
  return {'flops': float(c.get('flops', 0.0)) + extra['flops'],
          'bytes_accessed': float(c.get('bytes accessed', 0.0)) + extra['bytes_accessed']}


def ideal_fsdp_bytes(params, config) -> float:
  """What FSDP done ideally sends over each device's links a step: every param sharded over
  the fsdp axis gathered in the forward pass, again in the backward when remat recomputes the
  forward (model.remat 'full'), and its gradient reduce-scattered once, each a ring over the
  fsdp axis moving (fsdp-1)/fsdp of the whole array; 0 on a mesh without FSDP. Gathers move
  the compute dtype (model.dtype: the model casts its params to it); so do the gradients: the
  gradient of a param cast to the compute dtype is formed in that dtype, and the cast's
  transpose takes it back to the param dtype after the reduction. params: the abstract
  params, sharded."""
  per_element = (3 if config.model.remat == 'full' else 2) * jnp.dtype(config.model.dtype).itemsize
  total = 0.0
  for x in jax.tree.leaves(params):
    fsdp = x.sharding.mesh.shape.get('fsdp', 1)
    axes = [a for entry in x.sharding.spec for a in ((entry,) if isinstance(entry, str) else entry or ())]
    if fsdp > 1 and 'fsdp' in axes:
      total += (fsdp - 1) / fsdp * x.size * per_element
  return total


def analyse(entry: dict, compiled, chip, num_devices: int, model_flops: float | None,
            ideal_fsdp: float | None = None) -> dict:
  """Memory, cost, collectives, loops and the step-time lower bounds of a compiled program;
  ideal_fsdp: the config's ideal FSDP link bytes (ideal_fsdp_bytes), beside the program's."""
  program = hlo.Program(compiled.as_text())  # read once: its loops, collectives and the loops' missed trips
  mem, c = memory(compiled), cost(compiled, program)
  entry.update(memory=mem, bytes_per_device=mem['total'], fits=mem['total'] <= chip.hbm_bytes,
               xla_flops_per_device=c['flops'], bytes_accessed_per_device=c['bytes_accessed'])
  coll = hlo.collectives(program)
  entry['collectives'] = coll
  entry['collective_bytes_per_device'] = sum(v['bytes'] for v in coll.values())
  entry['link_bytes_per_device'] = sum(v['link_bytes'] for v in coll.values())
  entry['loops'] = program.loops  # each while loop's trips and how they were read
  entry['loops_unread'] = [loop['while'] for loop in program.loops if loop['read'] == 'unread']
  if ideal_fsdp is not None:
    entry['ideal_fsdp_bytes_per_device'] = ideal_fsdp
    entry['link_to_ideal_fsdp'] = entry['link_bytes_per_device'] / ideal_fsdp if ideal_fsdp else None
  # the model's FLOPs split over the devices floor the compute bound: a TPU program's matmuls are
  # convolutions, which hlo.loop_trips_cost does not count in a scan's missed trips
  t_compute = max(c['flops'], (model_flops or 0.0) / num_devices) / chip.peak_flops
  t_memory = c['bytes_accessed'] / chip.hbm_bandwidth
  bound = max(t_compute, t_memory)
  entry['lower_bound_s'] = {'compute': t_compute, 'hbm': t_memory, 'step': bound}
  if model_flops is not None:
    entry['model_flops_per_step'] = model_flops
    entry['mfu_ceiling'] = model_flops / (num_devices * chip.peak_flops * bound) if bound else None
  return entry


def train_step(plan, setup, variant, chip, num_devices: int) -> dict:
  """The variant's compiled train step, analysed (or refused, with its largest buffers)."""
  name = f'train/{variant.name}' if variant.metric_prefix else 'train'
  entry, compiled = compile_program(name, lambda: step_lib.compile_train_step(plan, setup, variant))
  entry.update(kind='train', variant=variant.name, batch_size=variant.batch_size)
  if compiled is not None:
    analyse(entry, compiled, chip, num_devices, plan.recipe.train_flops(plan.config, variant),
            ideal_fsdp_bytes(setup.abstract['params'], plan.config))
  if not entry['fits']:
    entry['largest_buffers'] = hlo.dumped_buffers('jit_train_step') or hlo.largest_leaves(setup.abstract)
  return entry


def eval_batch(config) -> int:
  sizes = [e.batch_size for e in config.evals.values() if e.get('batch_size')]
  return max(sizes or [DEFAULT_EVAL_BATCH])


def eval_encoders(plan, setup) -> list:
  """[(name, jitted, abstract args)] of the recipe's encoders ('image', 'text', 'video', ...)."""
  config, mesh = plan.config, setup.mesh
  b = embed.global_batch(eval_batch(config), mesh)
  sh = parallel.batch_sharding(mesh)
  fns = plan.recipe.predict_fns(setup.graphdef)
  out = []
  for kind, (_, shape, dtype) in plan.recipe.export_encoders(config.model).items():
    dtype = jnp.uint8 if jnp.issubdtype(dtype, jnp.floating) else dtype  # pixels travel as uint8
    specs = (jax.ShapeDtypeStruct((b, *shape), dtype, sharding=sh), jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh))
    jitted = jax.jit(embed.with_row_ids(fns[kind]), in_shardings=(setup.shardings['params'], sh, sh),
                     out_shardings=parallel.replicated(mesh))  # as vlp.eval.embed runs it
    out.append((f'encode_{kind}', jitted, (setup.abstract['params'], *specs)))
  return out


def eval_encoder(name: str, jitted, args, chip, num_devices: int) -> dict:
  def build():
    t = time.perf_counter()
    return jitted.lower(*args).compile(), time.perf_counter() - t
  entry, compiled = compile_program(f'eval/{name}', build)
  entry['kind'] = 'eval'
  if compiled is not None:
    analyse(entry, compiled, chip, num_devices, None)
  if not entry['fits']:
    entry['largest_buffers'] = hlo.dumped_buffers('jit_*lambda') or hlo.largest_leaves(args, name='args')
  return entry
