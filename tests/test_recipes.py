"""Recipes: a model family from outside vlp/ trains through the protocol alone, and every
recipe trains several tasks by alternating gradient descent (here ALIGN at two resolutions
from two data sources), resuming bit for bit."""

import numpy as np
import pytest
from conftest import tiny_config

import recipe_bag_of_words
from vlp import plan as plan_lib, recipes
from vlp.core import config as config_lib
from vlp.train import loop
from vlp.workdir import metrics as metrics_lib


def test_a_recipe_registered_outside_vlp_trains_and_evaluates(tmp_path):
  c = recipes.base_config('bag_of_words')
  c.update(total_steps=2, batch_size=16, log_every=1, eval_every=0)
  c.data.update(train_examples=200, eval_images=16, num_workers=0, prefetch=2)
  c.optim.update(warmup_steps=1)
  c.checkpoint.update(every=2, async_save=False)
  assert plan_lib.make(c, 8).recipe is recipe_bag_of_words.RECIPE
  result = loop.train(c, str(tmp_path), progress=False)
  rows = metrics_lib.read_jsonl(str(tmp_path))
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert 0 <= result['retrieval/i2t@1'] <= 100  # vlp's evaluator, through the default predict_fns
  assert (tmp_path / 'checkpoints' / '2').is_dir()


def test_an_unknown_recipe_is_one_config_error():
  with pytest.raises(config_lib.ConfigError, match="config key 'model.name': unknown model 'clip'; known: .*albef"):
    recipes.get('clip')


def _two_tasks(total_steps):
  """ALIGN by alternating gradient descent: the built-in scenes at 48 px (batch 16) and
  config.data (the built-in scenes again, another order) at 64 px (batch 8)."""
  c = tiny_config(total_steps=total_steps, **{'model.image.patch_size': 8, 'checkpoint.every': 3})
  c.tasks.scenes_48 = config_lib.task_config(data='synthetic', batch_size=16, resolutions=(48,))
  c.tasks.data_64 = config_lib.task_config(data='task', batch_size=8, resolutions=(64,), label_smoothing=0.1)
  return c


def test_align_with_two_tasks_plans_their_own_batches_and_inputs():
  plan = plan_lib.make(_two_tasks(6), 8)
  by_name = {v.name: v for v in plan.variants}
  assert {n: (v.batch_size, v.image_size, v.data_item) for n, v in by_name.items()} == {
      'scenes_48': (16, 48, 'data_scenes_48'), 'data_64': (8, 64, 'data_data_64')}
  assert by_name['data_64'].spec['image'].shape == (8, 64, 64, 3)
  assert by_name['scenes_48'].metric_prefix == 'scenes_48/'


@pytest.mark.slow
def test_align_with_two_tasks_trains_and_resumes_bit_for_bit(tmp_path):
  loop.train(_two_tasks(6), str(tmp_path / 'straight'), progress=False)
  loop.train(_two_tasks(3), str(tmp_path / 'resumed'), progress=False)
  result = loop.train(_two_tasks(6), str(tmp_path / 'resumed'), progress=False)

  def per_step(wd):
    out = {}
    for r in metrics_lib.read_jsonl(str(wd)):
      for k, v in r.items():
        if k.endswith('/loss'):
          out[r['step']] = (k, v)
    return out

  straight, resumed = per_step(tmp_path / 'straight'), per_step(tmp_path / 'resumed')
  assert sorted(straight) == [1, 2, 3, 4, 5, 6]
  assert {k for k, _ in straight.values()} == {'scenes_48/loss', 'data_64/loss'}
  assert resumed == straight  # the same task at every step, the same loss to the bit
  assert result['time']['step_compiles'] == 0

