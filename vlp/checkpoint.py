"""Orbax checkpoints of the train state and the Grain iterator, as items of
one checkpoint, so a resumed run sees exactly the batches it would have seen.
A model with tasks (IMP) has one iterator per task variant, each its own item
(`data_<variant>`); otherwise the one iterator is the item `data`.

Every process takes part in a save (each writes its shards of the state and
its own input position). The state restores onto whatever shardings the
caller asks for: another mesh, device or process count (Orbax reshards). The
input positions restore only onto the same process count; with
`checkpoint.restore_data=False` a run takes the state alone and starts its
input pipeline afresh. Each step carries metadata: the config and the
versions of jax, flax, orbax and vlp (`step_metadata`).

A state whose block stacks were saved in the other layout (stacked under model.scan_layers,
per block without: vlp.models.stacks) restores into either: the saved layout is read from the
checkpoint's tree metadata, restored as it is and converted, so a run may switch scan_layers
and resume.

Where the checkpoints lie in a workdir, and what a resume must keep of the config, is
vlp.workdir's; this module is Orbax alone: save, restore, integrity, retries.
"""
import importlib.metadata
import json
import re

import grain
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp.core import distributed, paths, retry
from vlp.models import stacks


class WorkdirMismatch(ValueError):
  """The workdir holds a checkpoint of another model, data stream or process count."""


class CorruptCheckpoint(FileNotFoundError):
  """A checkpoint that does not restore: a truncated or corrupt file, a missing one, a partial commit."""


COMMIT_MARKER = 'commit_success.txt'  # Orbax writes it last, into the step and each item
# a storage that did not answer, not a damaged checkpoint: the run stops instead of setting the step aside
_UNREACHABLE = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'Connection refused', 'Connection reset', 'timed out')


class SaveFailed(paths.StorageError):
  """A checkpoint could not be written; `cause`: what the storage raised (None: the save hung)."""

  def __init__(self, msg, cause=None):
    super().__init__(msg)
    self.cause = cause


def versions() -> dict:
  return {p: importlib.metadata.version(p) for p in ('jax', 'jaxlib', 'flax', 'orbax-checkpoint', 'grain', 'vlp')}


class Checkpointer:
  """The checkpoints in `directory` (config.checkpoint's cfg); steps that do not restore are set
  aside into `set_aside_to` (vlp.workdir.checkpoints makes one for a workdir)."""

  def __init__(self, directory: str, cfg, read_only: bool = False, data_items=('data',), set_aside_to: str = ''):
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, save_interval_steps=cfg.every,
        keep_period=cfg.keep_every or None,
        enable_async_checkpointing=cfg.async_save, read_only=read_only,
        cleanup_tmp_directories=not read_only)  # the half-written steps of a killed run (or a failed save)
    self.directory, self.set_aside_to = paths.abspath(directory), set_aside_to
    self.read_only, self._data_items = read_only, data_items
    self.save_timeout = cfg.get('save_timeout_s', 900)
    self._saving = self._failed_step = None  # the step of the save in flight; of the last one waited for
    self.save_retries = 0  # saves that failed on a transient storage error and were made again
    self.broken = False  # a save failed: Orbax's threads may be stuck, close() must not wait on them
    self.manager = self._manager()

  def _manager(self):
    return ocp.CheckpointManager(
        self.directory, options=self._options,
        # the same files either way; a reader's handler can restore a part of the state
        item_handlers={'state': ocp.PyTreeCheckpointHandler() if self.read_only else ocp.StandardCheckpointHandler(),
                       **{item: grain.checkpoint.CheckpointHandler() for item in self._data_items}})

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def resume_step(self, requested: int | None = None):
    """The step to resume from: the latest (None) or `requested`, which must have been saved.

    Resuming an earlier step branches the run: the checkpoints after it are
    deleted, so the new trajectory's checkpoints can take their step numbers.
    (Hence a flag of one launch, `vlp train --step`, not a config key that a
    relaunch after a preemption would repeat.)
    """
    if requested is None:
      return self.latest_step()
    steps = self.all_steps()
    self._saved(requested)
    for later in (s for s in steps if s > requested):
      if jax.process_index() == 0:
        print(f'resuming step {requested}: deleting the later checkpoint {later}')
      self.manager.delete(later)
    return requested

  def resume(self, requested: int | None, abstract_state, data_iterators=None):
    """(step, state) to go on from: `requested` (see resume_step), or the newest step that restores;
    (None, None) when there is none.

    A newest step that does not restore is reported in one line naming it and why, set aside
    into checkpoints_corrupt/ (its step number can be saved again), and the next older one
    tried. A requested step that does not restore raises CorruptCheckpoint instead.
    """
    if requested is not None:
      state = self._restore_requested(requested, abstract_state, data_iterators)
      return self.resume_step(requested), state
    return self.newest_restorable(abstract_state, data_iterators=data_iterators, set_aside=True)

  def newest_restorable(self, abstract_state, requested: int | None = None, data_iterators=None,
                        set_aside: bool = False):
    """(step, state): `requested`, or the newest step that restores; for a reader (eval, export)
    and a rollback.

    As in `resume`, a newer step that does not restore is reported in one line and the next older
    one tried; it is set aside only with `set_aside` (a reader changes nothing in the workdir). A
    requested step that does not restore raises CorruptCheckpoint; (None, None) when no step restores.
    """
    if requested is not None:
      return requested, self._restore_requested(requested, abstract_state, data_iterators)
    steps = self.all_steps()
    for i in range(len(steps) - 1, -1, -1):
      try:
        state, why = self.restore(steps[i], abstract_state, data_iterators), None
      except CorruptCheckpoint as e:
        state, why = None, str(e)
      why, process = distributed.first_failure(why)  # a step one process cannot restore is taken by none
      if why is None:
        return steps[i], state
      why += '' if process is None else f' (on process {process})'
      verb = 'resuming' if set_aside else 'using'
      fallback = f'{verb} step {steps[i - 1]}' if i else 'no older checkpoint' + (
          ': starting afresh' if set_aside else '')
      if jax.process_index() == 0:
        print(f'{why}; {fallback}', flush=True)
      if set_aside:
        self._set_aside(steps[i])
    return None, None

  def _restore_requested(self, step, abstract_state, data_iterators):
    try:
      return self.restore(self._saved(step), abstract_state, data_iterators)
    except CorruptCheckpoint as e:
      raise CorruptCheckpoint(f'--step={step}: {e}') from None

  def _state_restore(self, abstract_state):
    """A run restores its whole state; a reader (read_only) may ask for a part of it, and only that
    part is read: an export of the params never reads the optimizer state (2x the params under Adam)."""
    if not self.read_only:
      return ocp.args.StandardRestore(abstract_state)
    return ocp.args.PyTreeRestore(item=abstract_state, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))

  def _saved(self, step):
    if step not in self.all_steps():
      raise FileNotFoundError(f'--step: no checkpoint of step {step} in {self.manager.directory} '
                              f'(saved: {self.all_steps()})')
    return step

  def _set_aside(self, step):
    """Moves a step that does not restore out of Orbax's way, kept for a post-mortem."""
    if jax.process_index() == 0:
      dest = self.set_aside_to
      paths.makedirs(dest)
      name = str(step)
      while paths.exists(paths.join(dest, name)):
        name += '_'
      paths.rename(paths.join(str(self.manager.directory), str(step)), paths.join(dest, name))
    self.manager.reload()

  def save(self, step: int, state, data_iterators=None, force=False, config=None) -> bool:
    """Starts a save (async: returns once the arrays are copied off the devices).
    data_iterators: {item: iterator}, or one iterator (the item 'data')."""
    items = {'state': ocp.args.StandardSave(state)}
    for item, it in _by_item(data_iterators).items():
      items[item] = grain.checkpoint.CheckpointSave(it)
    meta = {'versions': versions(), **({'config': json.loads(config.to_json())} if config is not None else {})}
    backoff = retry.Backoff(f'checkpoint of step {step}', self.save_timeout, 'checkpoint.save_timeout_s')
    try:  # Orbax's save would wait for the previous one itself, silently and without a deadline
      self.wait()
    except SaveFailed as e:  # the previous step's commit failed: this step takes its place
      self._retry(backoff, e, f': step {step}, saved now, takes the place of step {self._failed_step}')
    self._saving = step
    while True:  # its blocking part (directories, the copy off the devices) talks to the storage too
      try:
        return self._within_deadline(lambda: self.manager.save(
            step, args=ocp.args.Composite(**items), force=force, custom_metadata=meta))
      except SaveFailed as e:
        self._retry(backoff, e)

  def finish(self, step: int, state, data_iterators=None, config=None):
    """Waits for the last save (of `step`, whose `state` this is), saving it again after a transient failure."""
    backoff = retry.Backoff(f'checkpoint of step {step}', self.save_timeout, 'checkpoint.save_timeout_s')
    while True:
      try:
        return self.wait()
      except SaveFailed as e:
        if self._failed_step != step:
          raise
        self._retry(backoff, e, ': saving it again')
        self.save(step, state, data_iterators, force=True, config=config)

  def _retry(self, backoff, e: SaveFailed, then: str = ''):
    retry.back_off(backoff, e, e.cause, then)  # or raises e: the storage will not come back
    self.save_retries += 1
    self.manager, self.broken = self._manager(), False  # a fresh one: the failed one's threads may be stuck

  def step_metadata(self, step: int) -> dict:
    """{'versions': {...}, 'config': {...}} written with the checkpoint of `step`."""
    return dict(self.manager.metadata(step).custom_metadata or {})

  def restore(self, step, abstract_state, data_iterators=None):
    """Restores state (onto the shardings of `abstract_state`) and, if given, the iterators in place
    (data_iterators as for save). A step that does not restore raises CorruptCheckpoint naming it.
    A state saved with its block stacks in the other layout (model.scan_layers switched between
    runs: vlp.models.stacks) is restored as saved and converted."""
    saved = self._other_layout(step, abstract_state)
    restore_as = stacks.relayout(abstract_state, saved, _abstract_block, _abstract_stack) if saved else abstract_state
    items = {'state': self._state_restore(restore_as)}
    for item, it in _by_item(data_iterators).items():
      self._check_data_processes(step, item)
      items[item] = grain.checkpoint.CheckpointRestore(it)
    # checked by all before Orbax, whose collectives would wait for a process stopped at its own file
    why, process = distributed.first_failure(self._unreadable(step, items))
    if why is not None:
      raise self._corrupt(step, why if process is None else f'on process {process}: {why}')
    try:  # the state first: the iterators are set in place only once it has restored
      state = self.manager.restore(step, args=ocp.args.Composite(state=items.pop('state')))['state']
      if items:
        self.manager.restore(step, args=ocp.args.Composite(**items))
      return stacks.to_layout(state, abstract_state) if saved else state
    except Exception as e:  # noqa: BLE001 - whatever the file layer raised: one line naming the step
      while (e.__cause__ or e.__context__) is not None:  # the file layer's own words are at the root
        e = e.__cause__ or e.__context__
      why = f'{type(e).__name__}: {paths.first_line(e)}'
      if isinstance(e, (ConnectionError, TimeoutError)) or any(c in why for c in _UNREACHABLE):
        raise paths.StorageError(f'checkpoint step {step} in {self.manager.directory} could not be read '
                                 f'({why}); is the storage reachable? nothing was set aside') from None
      raise self._corrupt(step, why) from None

  def _other_layout(self, step, abstract_state) -> dict:
    """{path: saved keys} of the block containers that the checkpoint of `step` stores in another
    layout than `abstract_state` (empty: the same layout, or tree metadata that does not read, for
    the restore itself to report)."""
    try:
      saved = stacks.container_keys(self.manager.item_metadata(step)['state'])
    except Exception:  # noqa: BLE001 - a damaged checkpoint: the restore names what is wrong
      return {}
    wanted = stacks.container_keys(abstract_state)
    return {path: keys for path, keys in saved.items()
            if path in wanted and sorted(map(str, keys)) != sorted(map(str, wanted[path]))}

  def _unreadable(self, step, items) -> str | None:
    """Why this process cannot restore `step`, seen without Orbax (no commit marker, its input position)."""
    d = paths.join(str(self.manager.directory), str(step))
    missing = [p for p in ('', 'state/', *(f'{i}/' for i in items if i != 'state'))
               if not paths.exists(paths.join(d, f'{p}{COMMIT_MARKER}'))]
    if missing:
      return f'no {missing[0]}{COMMIT_MARKER}: a partial commit'
    for item in (i for i in items if i != 'state'):
      mine = paths.join(d, item, f'process_{jax.process_index()}-of-{jax.process_count()}.json')
      try:
        json.loads(paths.read_text(mine) if paths.exists(mine) else 'null')
      except (OSError, ValueError) as e:
        return f'{item}/{paths.basename(mine)}: {type(e).__name__}: {paths.first_line(e)}'
    return None

  def _corrupt(self, step, why) -> CorruptCheckpoint:
    return CorruptCheckpoint(f'checkpoint step {step} in {self.manager.directory} does not restore ({why})')

  def _check_data_processes(self, step, item):
    """Each process saved its own input position; a different process count cannot take them over."""
    data_dir = paths.join(str(self.manager.directory), str(step), item)
    saved = paths.glob(paths.join(data_dir, 'process_*-of-*.json'))
    counts = {int(re.search(r'-of-(\d+)\.json$', p).group(1)) for p in saved}
    if saved and jax.process_count() not in counts:
      raise WorkdirMismatch(
          f'checkpoint step {step} holds the input-pipeline positions of {sorted(counts)} '
          f'process(es); this run has {jax.process_count()}: every process reads its own share of '
          'the data, so resume with the same process count (or start a new --workdir)')

  def wait(self, warn_after: float = 60.0):
    """Until the async save in flight is committed (see _within_deadline)."""
    if self._saving is not None:
      # a failed async save ends its thread quietly; check_for_errors raises what it kept
      try:
        self._within_deadline(lambda: (self.manager.wait_until_finished(), self.manager.check_for_errors()),
                              warn_after)
      finally:
        self._failed_step, self._saving = self._saving, None

  def _within_deadline(self, fn, warn_after: float = 60.0):
    """fn() for the save of step self._saving (vlp.core.retry.watched: in a daemon thread, as Orbax may
    never come back when the storage went away mid-save), saying so every `warn_after` s; a failure,
    no return within checkpoint.save_timeout_s, or a stalled save is one line (SaveFailed), and the
    previous checkpoint stays restorable (a step counts only once committed)."""
    def warn(waited):
      if jax.process_index() == 0:
        print(f'checkpoint of step {self._saving} to {self.manager.directory} not written after {waited:.0f} s '
              f'(is the storage reachable?); still retrying; the previous checkpoint ({self._previous()}) '
              'stays restorable', flush=True)
    try:
      return retry.watched(fn, self.save_timeout, warn, self.directory if paths.is_remote(self.directory) else None,
                           warn_after, name=f'vlp-checkpoint-{self._saving}', setting='checkpoint.save_timeout_s')
    except Exception as e:  # noqa: BLE001 - one line; Orbax's threads may be stuck: close() must not wait on them
      self.broken = True
      timed_out = isinstance(e, retry.Hung) and not isinstance(e, retry.Stalled)
      raise SaveFailed(self._failed_message(e), cause=None if timed_out else e) from None

  def _previous(self):
    steps = [s for s in self.all_steps() if s != self._saving]
    return f'step {steps[-1]}' if steps else 'none'

  def _failed_message(self, e) -> str:
    return (f'checkpoint of step {self._saving} could not be written to {self.manager.directory} '
            f'({type(e).__name__}: {paths.first_line(e)}); the previous checkpoint ({self._previous()}) stays '
            'restorable')

  def close(self):
    if not self.broken:
      self.manager.close()


def _abstract_block(x, i):
  """Block i of a stacked abstract leaf: the leaf less its leading axis, sharded as a block's param."""
  del i
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)


def _abstract_stack(leaves):
  """Abstract blocks' leaves stacked on a leading axis, which is replicated (vlp.models.stacks.LAYERS)."""
  x, sharding = leaves[0], leaves[0].sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
  return jax.ShapeDtypeStruct((len(leaves), *x.shape), x.dtype, sharding=sharding)


def _by_item(data_iterators) -> dict:
  if data_iterators is None:
    return {}
  return data_iterators if isinstance(data_iterators, dict) else {'data': data_iterators}
