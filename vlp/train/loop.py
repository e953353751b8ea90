"""The training loop: data -> compiled step -> metrics (one step late) ->
checkpoints -> eval, with a time breakdown (compile, data wait, step,
checkpoint, eval) printed at the end. A SIGTERM ends it early, after the step
in flight and a checkpoint of it.

With IMP's tasks every step runs the task the schedule picks (vlp.train.agd):
its own iterator and compiled step, all compiled before the first step.
"""
import collections
import time

import jax
import tqdm

from vlp import checkpoint, config as config_lib, eval as eval_lib, parallel, tasks, workdir_check
from vlp.train import agd, metrics as metrics_lib, preemption, state as state_lib, step as step_lib


class Evaluators:
  """The evaluators of config.evals; `run(params)` yields ('<entry>/<metric>', value)."""

  def __init__(self, config, setup, tokenizer, task_data=None):
    self.evaluators = eval_lib.make(config, setup.graphdef, tokenizer, task_data)

  def __bool__(self):
    return bool(self.evaluators)

  def run(self, params):
    yield from eval_lib.run(self.evaluators, params).items()


def make_evaluator(config, setup, tokenizer, data=None):
  """The config's evaluators, or None when none has data."""
  evaluators = Evaluators(config, setup, tokenizer, data)
  return evaluators or None


def prepare(config, workdir, mesh=None):
  """Everything that must hold before compiling: validated config, mesh, workdir."""
  sizes = config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = mesh or parallel.make_mesh(sizes)
  workdir_check.prepare(config, workdir)  # remote paths answer, a shared workdir, the compile cache
  checkpoint.check_workdir(config, workdir)
  return mesh


def _log(*args):
  if jax.process_index() == 0:
    print(*args, flush=True)


def train(config, workdir: str, progress: bool = True, step: int | None = None) -> dict:
  """Trains (or resumes the latest checkpoint, or `step`) in `workdir`; returns the final eval metrics."""
  preempt = preemption.Preemption()  # from the start: a SIGTERM while compiling still saves after one step
  try:
    return _train(config, workdir, progress, step, preempt)
  finally:
    preempt.close()


def _train(config, workdir, progress, resume_at, preempt):
  times = collections.Counter()
  mesh = prepare(config, workdir)
  tokenizer = tasks.tokenizer_for(config)
  setup = state_lib.make_setup(config, mesh)
  # one variant (config.data), or IMP's tasks at each of their resolutions
  variants = agd.variants(config, dict(mesh.shape), jax.process_count())
  schedule = agd.Schedule(config, variants)
  iterators = {v.data_item: tasks.train_iterator(config, tokenizer, v) for v in variants}
  evaluator = make_evaluator(config, setup, tokenizer)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint, data_items=list(iterators))

  sizes = dict(mesh.shape)
  _log(parallel.format_memory_table(parallel.memory_table(setup.abstract, config, sizes), sizes))
  steps = {}
  for v in variants:  # every (task, shape) compiled once, before the first step
    steps[v.name], seconds = step_lib.compile_train_step(config, setup, v)
    times['compile'] += seconds
    if v.task:
      times[f'compile/{v.name}'] = seconds
      _log(f'compiled {v.name}: batch {v.batch_size} at {v.image_size} px in {seconds:.1f} s')
  start = ckpt.resume_step(resume_at)
  if start is None:
    start, state = 0, state_lib.init_state(config, setup)
  else:
    # The input positions are per process; without them the pipeline starts afresh.
    restore_data = config.checkpoint.restore_data
    state = ckpt.restore(start, setup.abstract, iterators if restore_data else None)
    _log(f'resumed step {start}' + ('' if restore_data else ' (train state only; input pipeline from its start)'))
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  batch_sharding = parallel.batch_sharding(mesh)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, disable=not progress or jax.process_index() != 0,
                  unit='step', dynamic_ncols=True)

  pending = None  # metrics of the previous step, read after the next step is dispatched
  last_log = (time.perf_counter(), 0.0, 0)  # (time, data wait so far, examples so far) at the last log line
  examples = 0
  latest = {}  # variant name -> its latest metrics since the last log line (tasks)
  final = {}
  skipped = collections.Counter()  # input records skipped this run, by reason
  done = start
  compiles = metrics_lib.CompileCounter()

  def flush(pending):
    nonlocal last_log
    step, variant, device_metrics = pending
    m = jax.device_get(device_metrics)
    if variant.task:  # per-task curves: '<variant>/loss', ...
      latest[variant.name] = m
    if step % config.log_every == 0 or step == config.total_steps:
      now, waited = time.perf_counter(), times['data_wait']
      elapsed = max(now - last_log[0], 1e-9)
      out = {f'{name}/{k}': x for name, vm in latest.items() for k, x in vm.items()} if latest else dict(m)
      out['examples_per_sec'] = (examples - last_log[2]) / elapsed
      out['data_wait_frac'] = (waited - last_log[1]) / elapsed  # share of time the loop waited for input
      out.update({f'skipped/{reason}': n for reason, n in skipped.items()})
      last_log = (now, waited, examples)
      latest.clear()
      writer.write(step, out)
      bar.set_postfix(loss=f"{m['loss']:.3f}", ex_s=f"{out['examples_per_sec']:.0f}",
                      **({'task': variant.name} if variant.task else {}))

  for step in range(start, config.total_steps):
    variant = variants[schedule(step)]
    t0 = time.perf_counter()
    host_batch = next(iterators[variant.data_item])
    skipped.update(host_batch.pop('skipped', {}))
    t1 = time.perf_counter()
    with compiles.counting():  # a step never compiles after the warm-up (tests read the count)
      batch = jax.make_array_from_process_local_data(batch_sharding, host_batch)
      state, device_metrics = steps[variant.name](state, batch)
    examples += variant.batch_size
    if pending is not None:
      flush(pending)
    t2 = time.perf_counter()
    times['data_wait'] += t1 - t0
    times['step'] += t2 - t1
    pending = (step + 1, variant, device_metrics)
    bar.update(1)
    done = step + 1
    stop = preempt.requested()
    if done % config.checkpoint.every == 0 or done == config.total_steps or stop:
      t = time.perf_counter()
      ckpt.save(done, state, iterators, force=True, config=config)
      blocked = time.perf_counter() - t  # an async save returns once the arrays are off the devices
      times['checkpoint'] += blocked
      times['checkpoint_blocked_max'] = max(times['checkpoint_blocked_max'], blocked)
      writer.write(done, {'checkpoint/blocked_s': blocked})
    if stop:
      _log(f'preempted: saved step {done}, exiting')
      final['preempted_at'] = done
      break
    if evaluator and (done == config.total_steps or (config.eval_every and done % config.eval_every == 0)):
      t = time.perf_counter()
      final = dict(evaluator.run(state['params']))
      times['eval'] += time.perf_counter() - t
      writer.write(done, final)
  if pending is not None:
    flush(pending)
  bar.close()
  for it in iterators.values():
    it.close()  # stops Grain's worker processes / prefetch thread
  t = time.perf_counter()
  ckpt.wait()
  ckpt.close()
  times['checkpoint'] += time.perf_counter() - t
  times['step_compiles'] = compiles.count
  writer.write(done, {f'time/{k}_s' if k != 'step_compiles' else 'time/step_compiles': v for k, v in times.items()})
  writer.close()
  if evaluator and not final and start == config.total_steps:  # nothing left to train: evaluate what is there
    final = dict(evaluator.run(state['params']))
  final['time'] = dict(times)
  return final
