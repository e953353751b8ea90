"""Alternating gradient descent: schedules, resolutions, masked updates, resume and compile counts."""
import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp import plan as plan_lib
from vlp.core import parallel, config_files
from vlp.core.config import ConfigError, task_config
from vlp.recipes import imp as imp_recipe
from vlp.train import agd, loop, metrics as metrics_lib
from vlp.workdir import metrics as workdir_metrics
from conftest import compile_of, init_of, plan_of, random_batch_of, setup_of, variants_of

IMP = imp_recipe.RECIPE
TINY_IMP = os.path.join(os.path.dirname(__file__), 'tiny_imp.py')


def imp_config(arg=None, **overrides):
  c = config_files.load(TINY_IMP, arg)
  return config_files.apply_overrides(c, [f'{k}={v}' for k, v in overrides.items()])


def _tasks(intervals=None, weights=None):
  c = imp_config()
  c.tasks = {}
  for i, name in enumerate(('a', 'b', 'c')):
    c.tasks[name] = task_config(interval=(intervals or (1, 1, 1))[i], weight=(weights or (1., 1., 1.))[i])
  return c


def _sequence(config, steps):
  plan = plan_of(config)
  schedule = agd.Schedule(plan)
  return [plan.variants[schedule(s)].task for s in range(steps)]


def test_interval_schedule_rotates_with_per_task_intervals():
  c = _tasks(intervals=(1, 2, 3))
  seq = _sequence(c, 70)
  # rounds 0..5: every task in round 0; a in all; b in 0, 2, 4; c in 0, 3
  assert seq[:10] == ['a', 'b', 'c', 'a', 'a', 'b', 'a', 'c', 'a', 'b']
  # lcm(1, 2, 3) = 6 rounds: a 6 + b 3 + c 2 = 11 steps
  assert len(agd.Schedule(plan_of(c)).period) == 11
  counts = collections.Counter(_sequence(c, 11 * 50))
  assert (counts['a'], counts['b'], counts['c']) == (300, 150, 100)
  assert _sequence(c, 70) == seq  # a pure function of the step


def test_weighted_schedule_follows_the_weights_and_the_seed():
  c = _tasks(weights=(1., 2., 5.))
  c.agd.schedule = 'weighted'
  n = 8000
  seq = _sequence(c, n)
  counts = collections.Counter(seq)
  for name, p in zip('abc', (1 / 8, 2 / 8, 5 / 8)):
    assert abs(counts[name] / n - p) < 4 * np.sqrt(p * (1 - p) / n)
  seq = _sequence(c, 500)
  assert _sequence(c, 500) == seq
  c.seed = 1
  assert _sequence(c, 500) != seq


def test_resolutions_take_turns_with_constant_tokens_per_step():
  c = imp_config()
  by_name = variants_of(c)
  small, large = by_name['image_text_16px'], by_name['image_text_32px']
  assert (small.batch_size, small.image_size) == (32, 16)
  # 32 px has 4x the patches: a quarter of the batch, divisible by the 8 batch devices
  assert (large.batch_size, large.image_size) == (8, 32)
  assert small.batch_size * 16 == large.batch_size * 64
  variants = list(by_name.values())
  schedule = agd.Schedule(plan_of(c))
  runs = [variants[schedule(s)].name for s in range(40) if variants[schedule(s)].task == 'image_text']
  assert runs[:4] == ['image_text_16px', 'image_text_32px'] * 2


def test_a_scaled_batch_that_the_devices_cannot_split_is_a_config_error():
  c = imp_config(**{'tasks.image_text.resolutions': (16, 64)})  # 32 * 16 / 256 = 2 examples at 64 px
  with pytest.raises(ConfigError, match=r"tasks.image_text.batch_size.*at 64 px.*8 equal parts"):
    plan_lib.validate(c, 8)


@pytest.mark.parametrize('override, message', [
    ({'tasks.image_text.modalities': ('text', 'image')}, 'a contrastive task takes a .vision, text. pair'),
    ({'tasks.image_class.data': 'task'}, 'classification needs labels'),
    ({'tasks.video_text.data': 'synthetic'}, "holds images, the task wants video"),
    ({'tasks.image_text.resolutions': (18,)}, 'not a positive multiple of the patch size 4'),
    ({'tasks.image_text.drop_token': 1.0}, r"tasks.image_text.drop_token': must be in \[0, 1\)"),
    ({'agd.schedule': 'random'}, "'random' not in interval/weighted"),
    ({'tasks.video_text.frames': 3}, '3 frames do not split into tubelets of 2'),
    ({'model.encoder.moe.num_experts': 4, 'model.encoder.moe.last': 1},  # every=2 of 1 block
     r"model.encoder.moe.every': every 2-th of the last 1 blocks is no block at all"),
])
def test_bad_task_configs_name_the_key(override, message):
  with pytest.raises(ConfigError, match=message):
    plan_lib.validate(imp_config(**override), 8)


def test_unknown_task_key_and_tasks_on_another_model():
  with pytest.raises(ConfigError, match=r"task has no key\(s\) \['batch'\]"):
    task_config(batch=3)
  c = imp_config()
  c.tasks.image_text.unlock()
  c.tasks.image_text.bach_size = 3
  with pytest.raises(ConfigError, match="tasks.image_text.bach_size': unknown key; did you mean 'tasks.image_text.batch_size'"):
    plan_lib.validate(c, 8)
  c = imp_config()
  c.model.name = 'align'  # an IMP config is not an ALIGN config: built by another recipe
  with pytest.raises(ConfigError, match=r"missing for model.name='align'; build the config with vlp.recipes.base_config\('align'\)"):
    plan_lib.validate(c, 8)


def _setup(config, mesh):
  setup = setup_of(config, mesh)
  return setup, init_of(config, setup)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_a_task_leaves_untouched_params_and_their_optimizer_state_alone():
  c = imp_config()
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  setup, state = _setup(c, mesh)
  variant = variants_of(c)['image_text_16px']
  before = _flat(jax.device_get(state))
  step, _ = compile_of(c, setup, variant)
  state, _ = step(state, random_batch_of(c, mesh, variant=variant))
  state, _ = step(state, random_batch_of(c, mesh, seed=1, variant=variant))
  after = _flat(jax.device_get(state))
  untouched = ('video_embed', 'video_head', 'scale_video_text', 'scale_image_class', 'scale_video_class')
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  for k in before:
    if any(f"['{u}']" in k for u in untouched):  # params, Adam's mu and nu: bit for bit
      assert k not in changed, k
  for name in ('encoder', 'image_embed', 'image_head', 'text_embed', 'text_head', 'scale_image_text'):
    assert any(f"['params']['{name}']" in k for k in changed), name
    assert any(".mu['" + name in k or f"mu['{name}']" in k for k in changed), name
  assert any(k.endswith('.count') for k in changed)  # one step count for all tasks


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
def test_touched_params_are_exactly_those_with_a_gradient():
  """The model's ownership table against autodiff: untouched params get exactly zero gradient."""
  c = imp_config()
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  setup, state = _setup(c, mesh)
  for v in variants_of(c).values():
    batch = random_batch_of(c, mesh, variant=v)
    loss = lambda p: IMP.loss(setup.graphdef, p, {}, batch, jnp.int32(3), c, v)[0]
    grads = jax.jit(jax.grad(loss))(state['params'])
    norms = {k: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(g))) for k, g in grads.items()}
    assert {k for k, n in norms.items() if n > 0} == set(grads) - IMP.untouched_params(v, grads), v.name


def test_compile_counter_counts_compilations():
  counter, x, y = metrics_lib.CompileCounter(), jnp.ones(7), jnp.zeros(7)
  f = jax.jit(lambda x: x * 3 + 1)
  with counter.counting():
    f(x).block_until_ready()
    f(y).block_until_ready()  # the same shapes: cached
  assert counter.count == 1


def _per_step(workdir):
  """step -> (variant, loss) from metrics.jsonl (log_every=1: one variant's metrics per step)."""
  out = {}
  for r in workdir_metrics.read_jsonl(str(workdir)):
    losses = {k[:-len('/loss')]: v for k, v in r.items() if k.endswith('/loss')}
    if losses:
      [(name, loss)] = losses.items()
      out[r['step']] = (name, loss)
  return out


@pytest.mark.slow
def test_resume_mid_schedule_continues_the_same_tasks_bit_for_bit_without_recompiling(tmp_path):
  straight = loop.train(imp_config(total_steps=6), str(tmp_path / 'straight'), progress=False)
  # stops after step 3 (image_class, image_text_16px, video_text); the same learning rates as 6 steps
  loop.train(imp_config(total_steps=3), str(tmp_path / 'resumed'), progress=False)
  resumed = loop.train(imp_config(total_steps=6), str(tmp_path / 'resumed'), progress=False)
  a, b = _per_step(tmp_path / 'straight'), _per_step(tmp_path / 'resumed')
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  assert a == b  # the same task at every step, the same loss to the bit
  names = set(variants_of(imp_config()))
  assert {name for name, _ in a.values()} == names  # all four variants ran
  for result in (straight, resumed):
    assert result['time']['step_compiles'] == 0  # switching tasks never compiled anything
    assert {k[len('compile/'):] for k in result['time'] if k.startswith('compile/')} == names
  assert 'data_video_text' in os.listdir(tmp_path / 'resumed' / 'checkpoints' / '6')


def test_gradient_accumulation_per_task():
  c = imp_config(**{'tasks.video_text.accum_steps': 2})
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  setup, state = _setup(c, mesh)
  v = variants_of(c)['video_text']
  assert v.accum_steps == 2
  step, _ = compile_of(c, setup, v)
  _, metrics = step(state, random_batch_of(c, mesh, variant=v))
  assert np.isfinite(float(metrics['loss']))
  with pytest.raises(ConfigError, match='video_text.batch_size.*32 equal parts'):
    plan_lib.validate(imp_config(**{'tasks.video_text.accum_steps': 4}), 8)
