"""Learning quality: the contrastive model-health metrics, and `vlp bench quality` (vlp against
open_clip trained side by side on the same examples)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import plan_of, tiny_config

from vlp.bench import compare, quality
from vlp.recipes import align
from vlp.workdir import metrics as metrics_lib


def test_health_metrics_against_numpy():
  rng = np.random.default_rng(0)
  n, d = 300, 16  # more rows than HEALTH_ROWS: the accuracy is over the first 256 rows
  text_raw = rng.normal(size=(n, d)).astype(np.float32)
  image_raw = (text_raw + rng.normal(scale=1.5, size=(n, d))).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  got = align.health_metrics(jnp.asarray(image_raw), jnp.asarray(text_raw), jnp.asarray(unit(image_raw)),
                             jnp.asarray(unit(text_raw)), jnp.float32(3.0), None)
  sims = unit(image_raw) @ unit(text_raw).T
  rows = align.HEALTH_ROWS
  want_i2t = np.mean(np.argmax(sims[:rows], axis=1) == np.arange(rows))
  want_t2i = np.mean(np.argmax(sims.T[:rows], axis=1) == np.arange(rows))
  assert 0.05 < want_i2t < 0.95  # neither trivial nor hopeless: the test can tell
  assert float(got['batch_acc_i2t']) == pytest.approx(want_i2t)
  assert float(got['batch_acc_t2i']) == pytest.approx(want_t2i)
  assert float(got['image_norm']) == pytest.approx(np.linalg.norm(image_raw, axis=1).mean(), rel=1e-5)
  assert float(got['text_norm']) == pytest.approx(np.linalg.norm(text_raw, axis=1).mean(), rel=1e-5)
  assert 'logit_bias' not in got
  with_bias = align.health_metrics(*map(jnp.asarray, (image_raw, text_raw, unit(image_raw), unit(text_raw))),
                                   jnp.float32(3.0), jnp.float32(-10.0))
  assert float(with_bias['logit_bias']) == -10.0


def test_training_logs_health_metrics(tmp_path):
  from vlp.train import loop
  c = tiny_config(**{'total_steps': 2, 'log_every': 1, 'eval_every': 0})
  loop.train(c, str(tmp_path), progress=False)
  row = metrics_lib.read_jsonl(str(tmp_path))[0]
  for k in ('logit_scale', 'image_norm', 'text_norm', 'batch_acc_i2t', 'batch_acc_t2i'):
    assert np.isfinite(row[k]), k
  assert row['logit_scale'] == pytest.approx(1 / 0.07, rel=1e-3)


def test_differences_name_only_what_differs():
  c = tiny_config()
  lines = quality.differences(c)
  assert not any(l.startswith(('optim.no_decay', 'arch.gelu', 'text causal')) for l in lines)
  c.optim.no_decay = ('pos_embed',)
  c.model.arch.gelu = 'tanh'
  c.model.logit_scale_init = 1.0
  lines = quality.differences(c)
  assert any(l.startswith('optim.no_decay') for l in lines) and any(l.startswith('arch.gelu') for l in lines)
  assert any(l.startswith('logit scale start') for l in lines)


def test_examples_are_the_trainers_batches_as_exact_uint8():
  c = tiny_config(**{'total_steps': 2, 'batch_size': 8, 'data.eval_images': 10})
  plan = plan_of(c, jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',)))
  data, tokenizer = quality.examples(plan)
  assert data['train_image'].dtype == np.uint8 and data['train_image'].shape[0] == 16
  from vlp.train import input as input_lib
  first = next(input_lib.train_iterator(plan, tokenizer, plan.variants[0]))
  np.testing.assert_array_equal(data['train_image'][:8], first['image'])
  np.testing.assert_array_equal(data['train_text'][:8], first['text'])
  assert len(data['text_to_image']) == len(data['eval_text']) and data['eval_image'].shape[0] == 10


def _bench_env():
  try:
    return compare.bench_python()
  except compare.ReferenceEnvError as e:
    pytest.skip(str(e))


@pytest.mark.slow
def test_bench_quality_against_open_clip_reduced(tmp_path):
  """`vlp bench quality --compare=open_clip` end to end, reduced: both sides train 30 steps and
  are scored on the same held-out scenes."""
  _bench_env()
  out = tmp_path / 'q.json'
  cmd = [sys.executable, '-m', 'vlp.cli', 'bench', 'quality', '--config=tests/tiny.py', f'--json={out}',
         '--config.total_steps=30', '--config.batch_size=32', '--config.data.eval_images=64',
         '--config.eval_every=0']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'open_clip' in proc.stdout and 'RSUM' in proc.stdout
  result = json.loads(out.read_text())
  vlp_row, oc_row = result['rows']
  for row in (vlp_row, oc_row):
    assert 0 <= row['i2t@1'] <= row['i2t@5'] <= row['i2t@10'] <= 100
    assert row['rsum'] == pytest.approx(sum(row[k] for k in quality.KEYS))
  chance = 6 * 100 * np.mean([1, 5, 10]) / 64  # RSUM of random embeddings, roughly
  assert vlp_row['rsum'] > chance and oc_row['rsum'] > chance  # both learnt something in 30 steps
  assert oc_row['loss_last'] < oc_row['loss_first']
