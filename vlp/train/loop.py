"""The training loop: data -> compiled step -> metrics (one step late) ->
checkpoints -> eval, with a time breakdown (compile, data wait, step,
checkpoint, eval) printed at the end. A SIGTERM ends it early, after the step
in flight and a checkpoint of it."""
import collections
import time

import jax
import tqdm
from flax import nnx

from vlp import checkpoint, config as config_lib, parallel, tasks
from vlp.eval import itm_rerank, retrieval
from vlp.train import metrics as metrics_lib, preemption, state as state_lib, step as step_lib


def make_evaluator(config, setup, tokenizer, data=None):
  """Retrieval on the held-out data, or None when the config names none."""
  graphdef = setup.graphdef
  data = data if data is not None else tasks.eval_data(config, tokenizer)
  if data is None:
    return None
  if data.get('skipped'):
    print(f"eval data: skipped {data['skipped']}")
  if config.model.name == 'albef':  # ITC retrieval, then re-ranked by ITM
    return itm_rerank.Evaluator(graphdef, data, config.albef.rerank_k)
  return retrieval.Evaluator(
      lambda params, x: nnx.merge(graphdef, params).encode_image(x),
      lambda params, t: nnx.merge(graphdef, params).encode_text(t), data)


def prepare(config, workdir, mesh=None):
  """Everything that must hold before compiling: validated config, mesh, workdir."""
  sizes = config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = mesh or parallel.make_mesh(sizes)
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
  data_iter = tasks.train_iterator(config, tokenizer)
  evaluator = make_evaluator(config, setup, tokenizer)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)

  sizes = dict(mesh.shape)
  _log(parallel.format_memory_table(parallel.memory_table(setup.abstract, config, sizes), sizes))
  train_step, times['compile'] = step_lib.compile_train_step(config, setup)
  start = ckpt.resume_step(resume_at)
  if start is None:
    start, state = 0, state_lib.init_state(config, setup)
  else:
    # The input positions are per process; without them the pipeline starts afresh.
    restore_data = config.checkpoint.restore_data
    state = ckpt.restore(start, setup.abstract, data_iter if restore_data else None)
    _log(f'resumed step {start}' + ('' if restore_data else ' (train state only; input pipeline from its start)'))
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  batch_sharding = parallel.batch_sharding(mesh)
  per_step = config.batch_size
  bar = tqdm.tqdm(total=config.total_steps, initial=start, disable=not progress or jax.process_index() != 0,
                  unit='step', dynamic_ncols=True)

  pending = None  # metrics of the previous step, read after the next step is dispatched
  last_log = (time.perf_counter(), 0.0)  # (time, data wait so far) at the last log line
  final = {}
  skipped = collections.Counter()  # input records skipped this run, by reason
  done = start

  def flush(pending):
    nonlocal last_log
    step, device_metrics = pending
    m = jax.device_get(device_metrics)
    if step % config.log_every == 0 or step == config.total_steps:
      now, waited = time.perf_counter(), times['data_wait']
      elapsed = max(now - last_log[0], 1e-9)
      m['examples_per_sec'] = per_step * min(config.log_every, step - start) / elapsed
      m['data_wait_frac'] = (waited - last_log[1]) / elapsed  # share of time the loop waited for input
      m.update({f'skipped/{reason}': n for reason, n in skipped.items()})
      last_log = (now, waited)
      writer.write(step, m)
      bar.set_postfix(loss=f"{m['loss']:.3f}", ex_s=f"{m['examples_per_sec']:.0f}")

  for step in range(start, config.total_steps):
    t0 = time.perf_counter()
    host_batch = next(data_iter)
    skipped.update(host_batch.pop('skipped', {}))
    t1 = time.perf_counter()
    batch = jax.make_array_from_process_local_data(batch_sharding, host_batch)
    state, device_metrics = train_step(state, batch)
    if pending is not None:
      flush(pending)
    t2 = time.perf_counter()
    times['data_wait'] += t1 - t0
    times['step'] += t2 - t1
    pending = (step + 1, device_metrics)
    bar.update(1)
    done = step + 1
    stop = preempt.requested()
    if done % config.checkpoint.every == 0 or done == config.total_steps or stop:
      t = time.perf_counter()
      ckpt.save(done, state, data_iter, force=True, config=config)
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
  data_iter.close()  # stops Grain's worker processes / prefetch thread
  t = time.perf_counter()
  ckpt.wait()
  ckpt.close()
  times['checkpoint'] += time.perf_counter() - t
  writer.write(done, {f'time/{k}_s': v for k, v in times.items()})
  writer.close()
  if evaluator and not final and start == config.total_steps:  # nothing left to train: evaluate what is there
    final = dict(evaluator.run(state['params']))
  final['time'] = dict(times)
  return final
