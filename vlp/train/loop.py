"""The training loop: data -> compiled step -> metrics (one step late) ->
checkpoints -> eval, with a time breakdown (compile, data wait, step,
checkpoint, eval) printed at the end. A SIGTERM ends it early, after the step
in flight and a checkpoint of it.

Every step runs the variant the schedule picks (vlp.train.agd): its own
iterator and compiled step, all compiled before the first step.
"""
import collections
import time
import types

import jax
import tqdm

from vlp import eval as eval_lib, plan as plan_lib
from vlp.core import parallel
from vlp.data import tokenizer as tokenizer_lib, records
from vlp.train import input as input_lib, agd, guard, init_from, metrics as metrics_lib, preemption, profile, state as state_lib, step as step_lib
from vlp.workdir import checkpoints, hosts, identity, metrics as workdir_metrics


class Evaluators:
  """The evaluators of config.evals; `run(params)` yields ('<entry>/<metric>', value)."""

  def __init__(self, plan, setup, tokenizer, task_data=None):
    self.evaluators = eval_lib.make(plan.config, plan.recipe.predict_fns(setup.graphdef), tokenizer, task_data)

  def __bool__(self):
    return bool(self.evaluators)

  def run(self, params):
    yield from eval_lib.run(self.evaluators, params).items()


def prepare(config, workdir, mesh=None):
  """Everything that must hold before compiling: the plan (a validated config), mesh, workdir."""
  plan = plan_lib.make(config, jax.device_count(), jax.process_count())
  mesh = mesh or parallel.make_mesh(plan.sizes)
  hosts.prepare(config, workdir)  # remote paths answer, a shared workdir, the compile cache
  identity.check_workdir(config, workdir)
  return plan, mesh


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


class _Logger:
  """Writes the metrics of log steps: per-variant curves ('<variant>/loss', ...) when there are
  several tasks, throughput, input wait and skipped records.

  Metrics stay on the device until a log step, or until `nonfinite.max_consecutive` steps are
  unread (so a run of non-finite steps, which were not applied, is seen at most that many steps
  late), then come back in one transfer: no host sync between those steps. The loop hands a
  step's metrics over one step late, after the next step is dispatched."""

  def __init__(self, config, writer, times, bar, tracker):
    self.config, self.writer, self.times, self.bar, self.tracker = config, writer, times, bar, tracker
    self.last = (time.perf_counter(), 0.0, 0)  # (time, data wait so far, examples so far) at the last line
    self.examples = 0
    self.latest = {}  # variant -> its latest metrics since the last log line
    self.skipped = collections.Counter()  # input records skipped this run, by reason
    self.unread = []  # (step, variant, metrics on the device) not read back yet
    self.reads = 0  # device -> host transfers of metrics (tests read it)

  def __call__(self, step, variant, device_metrics):
    self.unread.append((step, variant, device_metrics))
    log_step = step % self.config.log_every == 0 or step == self.config.total_steps
    if not log_step and len(self.unread) < self.config.nonfinite.max_consecutive:
      return
    self.read()
    if log_step:
      self.line(step, variant)

  def read(self):
    """Every unread step's metrics, in one transfer, through the guard's tracker."""
    if not self.unread:
      return
    steps, self.unread = self.unread, []
    self.reads += 1
    for (step, variant, _), m in zip(steps, jax.device_get([m for _, _, m in steps])):
      warnings = self.tracker.observe(step, variant.metric_prefix, m)
      if warnings:
        self.writer.write(step, warnings)
      self.latest[variant.metric_prefix] = {k: v for k, v in m.items() if k != 'nonfinite'}  # counted instead

  def line(self, step, variant):
    m = self.latest[variant.metric_prefix]
    now, waited = time.perf_counter(), self.times['data_wait']
    elapsed = max(now - self.last[0], 1e-9)
    out = {f'{prefix}{k}': x for prefix, vm in self.latest.items() for k, x in vm.items()}
    out['examples_per_sec'] = (self.examples - self.last[2]) / elapsed
    # the share of time the loop waited for input, on the slowest host (and the mean, which host)
    out.update(metrics_lib.across_hosts({'data_wait_frac': (waited - self.last[1]) / elapsed}))
    retries = self.skipped.get(records.RETRIED, 0)  # outages the input rode out: notes, not losses
    out.update({f'skipped/{reason}': n for reason, n in self.skipped.items() if reason != records.RETRIED})
    out['storage_retries'] = retries
    out['skipped_nonfinite'] = self.tracker.skipped
    self.last = (now, waited, self.examples)
    self.latest.clear()
    self.writer.write(step, out)
    task = {'task': variant.name} if variant.metric_prefix else {}
    self.bar.set_postfix(loss=f"{m['loss']:.3f}", ex_s=f"{out['examples_per_sec']:.0f}", **task)


def _compile_all(plan, setup, times) -> dict:
  """Every variant's step, compiled once before the first step."""
  steps = {}
  for v in plan.variants:
    steps[v.name], seconds = step_lib.compile_train_step(plan, setup, v)
    times['compile'] += seconds
    if v.metric_prefix:
      times[f'compile/{v.name}'] = seconds
    _log(f'compiled {v.name}: batch {v.batch_size} at {v.image_size} px in {seconds:.1f} s')
  return steps


def fresh_state(plan, setup):
  """The state of step 0: a fresh init, with config.init['from']'s params where it names a source."""
  return state_lib.init_state(plan, setup, init_from.load(plan.config, setup.abstract['params'], log=_log,
                                                         sources=plan.recipe.init_sources(plan.config)))


def _start(plan, setup, ckpt, iterators, resume_at):
  """(first step, state): a fresh state, or the checkpoint's (with the input positions)."""
  # The input positions are per process; without them the pipeline starts afresh.
  restore_data = plan.config.checkpoint.restore_data
  start, state = ckpt.resume(resume_at, setup.abstract, iterators if restore_data else None)
  if start is None:
    return 0, fresh_state(plan, setup)
  _log(f'resumed step {start}' + ('' if restore_data else ' (train state only; input pipeline from its start)'))
  return start, state


def _save(ckpt, done, state, iterators, config, writer, times) -> bool:
  """Starts the checkpoint of step `done`; False (and nothing saved) if a param is not finite."""
  t = time.perf_counter()
  if not guard.params_finite(state):
    _log(f'step {done}: a param is not finite: not saving this checkpoint')
    return False
  ckpt.save(done, state, iterators, force=True, config=config)
  blocked = time.perf_counter() - t  # an async save returns once the arrays are off the devices
  times['checkpoint'] += blocked
  times['checkpoint_blocked_max'] = max(times['checkpoint_blocked_max'], blocked)
  writer.write(done, {'checkpoint/blocked_s': blocked})
  return True


class _Rollback:
  """Rolls the train state back to the last checkpoint (a fresh state without one); the
  input pipeline goes on. A second rollback to the same checkpoint stops the run."""

  def __init__(self, plan, setup, ckpt, writer):
    self.plan, self.setup, self.ckpt, self.writer = plan, setup, ckpt, writer
    self.last = None  # the step rolled back to last time

  def __call__(self, at_step: int, why: str):
    self.ckpt.wait()
    target, state = self.ckpt.newest_restorable(self.setup.abstract, set_aside=True)
    target = target or 0
    if target == self.last:
      raise guard.Diverged(f'training diverged at step {at_step}: {why}, again after rolling back to step '
                           f'{target} with no checkpoint since; stopping (lower optim.lr, or look at the data)')
    self.last = target
    if state is None:
      state = fresh_state(self.plan, self.setup)
    _log(f'step {at_step}: {why}: rolled back to step {target}; the input pipeline goes on')
    self.writer.write(at_step, {'rollback/to_step': target})
    return target, state


def _train(config, workdir, progress, resume_at, preempt):
  times = collections.Counter()
  plan, mesh = prepare(config, workdir)
  tokenizer = tokenizer_lib.for_config(config)
  setup = state_lib.make_setup(plan, mesh)
  iterators = {v.data_item: input_lib.train_iterator(plan, tokenizer, v) for v in plan.variants}
  evaluator = Evaluators(plan, setup, tokenizer) or None
  ckpt = checkpoints.manager(workdir, config.checkpoint, data_items=list(iterators))
  _log(parallel.format_memory_table(parallel.memory_table(setup.abstract, plan.activation_bytes()), plan.sizes))
  start, state = _start(plan, setup, ckpt, iterators, resume_at)  # before compiling: a bad --step fails fast
  steps = _compile_all(plan, setup, times)
  writer = workdir_metrics.MetricWriter(workdir, resume_step=start)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, disable=not progress or jax.process_index() != 0,
                  unit='step', dynamic_ncols=True)
  log = _Logger(config, writer, times, bar, guard.Tracker(config.nonfinite, log=_log))
  run = types.SimpleNamespace(plan=plan, steps=steps, iterators=iterators, ckpt=ckpt, writer=writer, log=log,
                              times=times, preempt=preempt, evaluator=evaluator, bar=bar,
                              compiles=metrics_lib.CompileCounter(), rollback=_Rollback(plan, setup, ckpt, writer),
                              batch_sharding=parallel.batch_sharding(mesh),
                              trace=profile.StepTrace(config.profile.steps, workdir, log=_log))
  try:
    state, final, done = _steps(run, start, state)
    run.trace.stop(state)  # a run that ended inside config.profile.steps: its trace so far
  finally:
    run.trace.stop()
  times['metric_reads'] = log.reads  # device -> host transfers of step metrics
  bar.close()
  return _finish(config, state, start, iterators, ckpt, writer, times, run.compiles, evaluator, final, done)


def _steps(run, start, state):
  """Steps from `start` to the end (or a preemption); returns (state, final eval metrics, last step)."""
  config, log, times = run.plan.config, run.log, run.times
  schedule = agd.Schedule(run.plan)
  pending = None  # metrics of the previous step, read after the next step is dispatched
  final, done, step = {}, start, start
  while step < config.total_steps:
    variant = run.plan.variants[schedule(step)]
    run.trace.before(step, state)  # config.profile.steps
    t0 = time.perf_counter()
    host_batch = next(run.iterators[variant.data_item])
    log.skipped.update(host_batch.pop('skipped', {}))
    t1 = time.perf_counter()
    with run.compiles.counting():  # a step never compiles after the warm-up (tests read the count)
      batch = jax.make_array_from_process_local_data(run.batch_sharding, host_batch)
      state, device_metrics = run.steps[variant.name](state, batch)
    log.examples += variant.batch_size
    if pending is not None:
      log(*pending)
    times['data_wait'] += t1 - t0
    times['step'] += time.perf_counter() - t1
    pending, done, step = (step + 1, variant, device_metrics), step + 1, step + 1
    run.trace.after(done, state)
    run.bar.update(1)
    if log.tracker.rollback_due():  # seen one step late: the step just dispatched goes too
      pending, (step, state) = None, _roll_back(run, done - 1, f'{log.tracker.longest} non-finite steps in a row')
      done = step
      continue
    stop = run.preempt.requested()
    if done % config.checkpoint.every == 0 or done == config.total_steps or stop:
      if _in_nonfinite_run(device_metrics) and not (stop or done == config.total_steps):
        _log(f'step {done}: in a run of non-finite steps: not saving this checkpoint')
      elif not _save(run.ckpt, done, state, run.iterators, config, run.writer, times):
        if stop:
          _log(f'preempted: step {done} not saved (a param is not finite), exiting')
          break
        pending, (step, state) = None, _roll_back(run, done, 'a param is not finite')
        done = step
        continue
    if stop:
      _log(f'preempted: saved step {done}, exiting')
      final['preempted_at'] = done
      break
    if run.evaluator and (done == config.total_steps or (config.eval_every and done % config.eval_every == 0)):
      t = time.perf_counter()
      final = dict(run.evaluator.run(state['params']))
      times['eval'] += time.perf_counter() - t
      run.writer.write(done, final)
  if pending is not None:
    log(*pending)
  log.read()  # the steps after the last log line (a preemption): counted by the guard's tracker too
  return state, final, done


def _in_nonfinite_run(device_metrics) -> bool:
  """Whether the step just done was not applied (read now: a save step waits for the device anyway),
  so that a periodic checkpoint, the one a rollback goes to, is taken after a finite step."""
  return 'nonfinite' in device_metrics and float(device_metrics['nonfinite']) > 0


def _roll_back(run, at_step, why):
  step, state = run.rollback(at_step, why)
  run.log.tracker.rolled_back()
  run.bar.n = step
  run.bar.refresh()
  return step, state


def _finish(config, state, start, iterators, ckpt, writer, times, compiles, evaluator, final, done):
  t = time.perf_counter()
  ckpt.finish(done, state, iterators, config)  # a last save the storage refused for a while is made again
  ckpt.close()
  times['checkpoint'] += time.perf_counter() - t
  times['checkpoint_save_retries'] = ckpt.save_retries
  for it in iterators.values():
    it.close()  # stops Grain's worker processes / prefetch thread
  times['step_compiles'] = compiles.count
  # input wait and step time of the slowest host (a step waits for every host), and their means
  hosts = metrics_lib.across_hosts({k: times[k] for k in ('data_wait', 'step')})
  times.update({k: v for k, v in hosts.items() if not k.endswith('_host')})
  counts = ('step_compiles', 'metric_reads', 'checkpoint_save_retries')
  writer.write(done, {f'time/{k}' if k in counts else f'time/{k}_s': v for k, v in times.items()})
  writer.close()
  if evaluator and not final and start == config.total_steps:  # nothing left to train: evaluate what is there
    final = dict(evaluator.run(state['params']))
  final['time'] = dict(times)
  return final
