"""The non-finite guard: a NaN step changes nothing but the step counter, decided in the
compiled step; the loop counts skips, rolls back after K in a row, stops on a second
rollback to the same checkpoint; no checkpoint holds a non-finite param; loss spikes warn."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import compile_of, init_of, random_batch_of, setup_of, tiny_config

import grain
from vlp import recipes
from vlp.core import parallel
from vlp.core.pixels import normalize_image
from vlp.train import input as input_lib, guard, loop
from vlp.workdir import checkpoints, metrics as metrics_lib

MESH = {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}


@pytest.fixture
def float_images(monkeypatch):
  """Steps compiled for float32 images (model_input passes floats through), as a source
  of normalised float pixels would give them: uint8 pixels cannot be NaN, these can."""
  cls = type(recipes.get('align'))
  real = cls.batch_spec
  monkeypatch.setattr(cls, 'batch_spec', lambda self, c, v: {
      k: (shape, jnp.float32 if dtype == jnp.uint8 else dtype) for k, (shape, dtype) in real(self, c, v).items()})


def test_a_nonfinite_step_changes_nothing_but_the_step(float_images):
  config = tiny_config(ema_decay=0.9)
  mesh = parallel.make_mesh(MESH)
  setup = setup_of(config, mesh)
  state = init_of(config, setup)
  train_step, _ = compile_of(config, setup)
  good = random_batch_of(config, mesh)
  bad = dict(good, image=jnp.full_like(good['image'], jnp.nan))
  state, m = train_step(state, good)
  before = jax.device_get(state)  # the step donates its input
  state, m = train_step(state, bad)
  assert float(m['nonfinite']) == 1.0 and not np.isfinite(float(m['loss']))
  after = jax.device_get(state)
  assert after['step'] == before['step'] + 1
  for key in ('params', 'opt_state', 'ema_params'):
    jax.tree.map(np.testing.assert_array_equal, after[key], before[key])
  state, m = train_step(state, good)  # a finite step is applied again
  assert float(m['nonfinite']) == 0.0
  kernel = lambda s: s['params']['text']['encoder']['blocks'][0]['mlp']['fc1']['kernel']
  assert not np.array_equal(jax.device_get(kernel(state)), kernel(before))
  assert guard.params_finite(state)
  poisoned = dict(state, params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), state['params']))
  assert not guard.params_finite(poisoned)


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(guard=True, max_consecutive=3, spike_window=20, spike_zscore=6.0), **kw))


def test_tracker_counts_runs_of_nonfinite_steps_and_warns_of_spikes():
  lines = []
  tracker = guard.Tracker(_cfg(), log=lines.append)
  rng = np.random.default_rng(0)
  for step in range(1, 31):
    assert tracker.observe(step, '', {'loss': 5.0 + 0.1 * rng.normal(), 'grad_norm': 1.0, 'nonfinite': 0.0}) == {}
  warn = tracker.observe(31, 'a/', {'loss': 9.0, 'grad_norm': 1.0, 'nonfinite': 0.0})
  assert warn == {}  # another variant's window: too few losses to judge
  warn = tracker.observe(32, '', {'loss': 9.0, 'grad_norm': 1.0, 'nonfinite': 0.0})
  assert set(warn) == {'warn/loss_spike_z'} and warn['warn/loss_spike_z'] > 6
  assert 'step 32: loss spike' in lines[-1]
  for step in (33, 34):
    tracker.observe(step, '', {'loss': float('nan'), 'grad_norm': float('inf'), 'nonfinite': 1.0})
  assert tracker.skipped == 2 and not tracker.rollback_due()
  assert lines[-1] == 'step 34: loss nan, grad_norm inf: not applied (skipped_nonfinite 2, 2 in a row)'
  tracker.observe(35, '', {'loss': 5.0, 'grad_norm': 1.0, 'nonfinite': 0.0})  # the run is broken
  for step in (36, 37, 38):
    tracker.observe(step, '', {'loss': float('nan'), 'grad_norm': 1.0, 'nonfinite': 1.0})
  assert tracker.skipped == 5 and tracker.in_a_row == 3 and tracker.rollback_due()
  tracker.observe(39, '', {'loss': 5.0, 'grad_norm': 1.0, 'nonfinite': 0.0})  # read in the same transfer
  assert tracker.in_a_row == 0 and tracker.rollback_due()  # the run was seen: the rollback stays due
  tracker.rolled_back()
  assert not tracker.rollback_due()


class _Poisoned(grain.DatasetIterator):
  """The task's real iterator, its images normalised on the host (float_images), those of the
  n-th batches (1-based, counted over the run: a rollback does not rewind it) made NaN."""

  def __init__(self, it, bad):  # noqa: super().__init__ would want parents: this wraps one
    self.it, self.bad, self.n = it, bad, 0

  def __next__(self):
    batch = next(self.it)
    self.n += 1
    image = batch['image']
    image = normalize_image(image) if image.dtype == np.uint8 else image  # wrapped twice: once
    return dict(batch, image=np.full_like(image, np.nan) if self.bad(self.n) else image)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)

  def start_prefetch(self):
    getattr(self.it, 'start_prefetch', lambda: None)()

  def close(self):
    self.it.close()


def _poison(monkeypatch, bad):
  real = input_lib.train_iterator
  monkeypatch.setattr(input_lib, 'train_iterator', lambda *a: _Poisoned(real(*a), bad))


@pytest.mark.slow
def test_skips_then_a_rollback_then_a_divergence_stops(tmp_path, monkeypatch, capsys, float_images):
  cache = str(tmp_path / 'compile_cache')  # the second run compiles nothing
  over = {'total_steps': 12, 'checkpoint.every': 3, 'nonfinite.max_consecutive': 3, 'compile_cache': cache}
  _poison(monkeypatch, lambda n: n in (4, 5, 8, 9, 10))
  loop.train(tiny_config(**over), str(tmp_path / 'a'), progress=False)
  out = capsys.readouterr().out
  assert 'step 5: loss nan, grad_norm nan: not applied (skipped_nonfinite 2, 2 in a row)' in out
  assert 'step 9: in a run of non-finite steps: not saving this checkpoint' in out
  assert 'step 10: 3 non-finite steps in a row: rolled back to step 6; the input pipeline goes on' in out
  log = metrics_lib.read_jsonl(str(tmp_path / 'a'))
  assert [r['rollback/to_step'] for r in log if 'rollback/to_step' in r] == [6]
  assert [r for r in log if 'skipped_nonfinite' in r][-1]['skipped_nonfinite'] == 5
  assert all(np.isfinite(r['loss']) for r in log if r['step'] > 10 and 'loss' in r)  # batches 12- are fine
  ckpt = checkpoints.manager(str(tmp_path / 'a'), tiny_config().checkpoint, read_only=True)
  assert ckpt.all_steps() == [6, 9, 12]  # 9 saved after the rollback (keep 3)

  _poison(monkeypatch, lambda n: n >= 4)  # diverged for good: the rollback does not help
  with pytest.raises(guard.Diverged, match=r'^training diverged at step 6: 3 non-finite steps in a row, '
                                          r'again after rolling back to step 3 with no checkpoint since'):
    loop.train(tiny_config(**over), str(tmp_path / 'b'), progress=False)
  assert 'step 6: 3 non-finite steps in a row: rolled back to step 3' in capsys.readouterr().out


@pytest.mark.slow
def test_metrics_come_back_on_log_steps_and_a_run_of_nonfinite_steps_is_still_caught(
    tmp_path, monkeypatch, capsys, float_images):
  """log_every=100: the metrics of 12 steps come back in a few transfers (every max_consecutive
  unread steps), and the run of 3 non-finite steps 5-7, read with the finite steps 8-9 after
  it, still rolls back (to step 9's checkpoint: the steps were not applied, so it is good)."""
  over = {'total_steps': 12, 'log_every': 100, 'checkpoint.every': 3, 'nonfinite.max_consecutive': 3}
  _poison(monkeypatch, lambda n: n in (5, 6, 7))
  result = loop.train(tiny_config(**over), str(tmp_path / 'a'), progress=False)
  out = capsys.readouterr().out
  assert 'step 7: loss nan, grad_norm nan: not applied (skipped_nonfinite 3, 3 in a row)' in out
  assert 'step 9: 3 non-finite steps in a row: rolled back to step 9' in out
  log = metrics_lib.read_jsonl(str(tmp_path / 'a'))
  assert [r['step'] for r in log if 'loss' in r] == [12]  # the one log step
  assert [r['skipped_nonfinite'] for r in log if 'skipped_nonfinite' in r] == [3]
  assert result['time']['metric_reads'] <= 5  # 13 steps' metrics (step 10 again after the rollback)

