"""config.evals in training and in `vlp eval`: results JSON, tables, the plot."""
import json
import os

import pytest
from conftest import tiny_config

from vlp import cli
from vlp.core import config as config_lib
from vlp.train import loop
from vlp.workdir import metrics as metrics_lib


@pytest.mark.slow
def test_evaluators_run_in_training_and_in_vlp_eval(tmp_path, capsys):
  config = tiny_config(total_steps=4, eval_every=2, **{'data.eval_images': 16})
  config.evals.zs = config_lib.eval_config('zeroshot', data='synthetic', num_images=24, batch_size=64)
  wd = str(tmp_path / 'wd')
  result = loop.train(config, wd, progress=False)
  assert {'retrieval/rsum', 'retrieval/en/t2i@1', 'zs/acc1', 'zs/acc5', 'zs/mean_per_class_recall'} <= set(result)
  evals = [r for r in metrics_lib.read_jsonl(wd) if 'zs/acc1' in r]
  assert [r['step'] for r in evals] == [2, 4] and all('retrieval/i2t@1' in r for r in evals)
  capsys.readouterr()
  assert cli.main(['eval', f'--workdir={wd}', '--plot']) == 0
  out = capsys.readouterr().out
  assert 'image->text' in out and 'acc1' in out and 'RSUM' in out
  with open(os.path.join(wd, 'eval_4.json')) as f:
    records = {r['eval']: r for r in json.load(f)}
  retrieval, zs = records['retrieval'], records['zs']
  assert (retrieval['task'], retrieval['dataset']) == ('zeroshot_retrieval', 'vlp/synthetic')
  assert zs['task'] == 'zeroshot_classification'
  # clip_benchmark keys and units (fractions); the same numbers as the end of training
  assert retrieval['metrics']['image_retrieval_recall@5'] == pytest.approx(result['retrieval/t2i@5'] / 100)
  assert retrieval['metrics']['text_retrieval_recall@1'] == pytest.approx(result['retrieval/i2t@1'] / 100)
  assert zs['metrics']['acc1'] == pytest.approx(result['zs/acc1'] / 100)
  png = os.path.join(wd, 'metrics.png')
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  os.remove(png)
  assert cli.main(['plot', f'--workdir={wd}', f'--out={tmp_path / "p.png"}']) == 0
  assert os.path.getsize(tmp_path / 'p.png') > 10_000


def test_the_train_summary_names_rerankings_and_languages_apart(capsys):
  """`vlp train`'s closing tables: ALBEF's re-rankings get a table each, languages one RSUM line."""
  from vlp import cli
  result = {}
  for prefix in ('retrieval/', 'retrieval/de/', 'retrieval/fr/', 'retrieval/itm_itc/'):
    for k in (1, 5, 10):
      result[f'{prefix}i2t@{k}'], result[f'{prefix}t2i@{k}'] = float(k), 2.0 * k
    result[f'{prefix}rsum'] = {'retrieval/de/': 1.5, 'retrieval/fr/': 2.5}.get(prefix, 9.0)
  cli._print_result(result)
  out = capsys.readouterr().out
  assert '[retrieval] re-ranked by ITM + ITC' in out and '[retrieval] RSUM by language: de 1.5, fr 2.5' in out
  assert 're-ranked by de' not in out and 're-ranked by fr' not in out


def test_the_sharded_embedder_equals_one_device_on_a_tensor_mesh_with_padding():
  """Every device embeds its share of each (padded) batch and the rows come back in the set's
  order: the same embeddings as the params on one device, batch by batch."""
  import jax
  import numpy as np
  from conftest import build_model, plan_of, setup_of
  from flax import nnx
  from vlp.core import parallel
  from vlp.core.pixels import normalize_image
  from vlp.eval import embed
  from vlp.train import loop
  config = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  plan, setup = plan_of(config, mesh), setup_of(config, mesh)
  params = loop.fresh_state(plan, setup)['params']
  assert embed.mesh_of(params) is mesh
  assert any('tensor' in str(x.sharding.spec) for x in jax.tree.leaves(params))  # weights split over tensor
  graphdef = nnx.split(build_model(config.model), nnx.Param)[0]
  fns = plan.recipe.predict_fns(graphdef)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (19, 16, 16, 3), dtype=np.uint8)  # batches of 6 (rounded up to 8): padded
  tokens = rng.integers(5, 1024, (11, 16), dtype=np.int32)
  on_one = jax.device_get(params)  # numpy: the one-device path
  want_images = np.asarray(fns['image'](on_one, normalize_image(images)))
  want_text = np.asarray(fns['text'](on_one, tokens))
  got_images = embed.Encoder(fns['image'])(params, images, batch_size=6)
  got_text = embed.Encoder(fns['text'])(params, tokens, batch_size=6)
  np.testing.assert_allclose(got_images, want_images, atol=1e-6)
  np.testing.assert_allclose(got_text, want_text, atol=1e-6)
  np.testing.assert_allclose(embed.Encoder(fns['image'])(on_one, images, batch_size=6), want_images, atol=1e-6)


def _eval_worker(out, processes, devices):
  import subprocess
  import sys
  import portpicker
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'eval_worker.py')
  port = portpicker.pick_unused_port()
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}
  args = [[]] if processes == 1 else [[f'localhost:{port}', str(processes), str(i)] for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, worker, str(out), *a], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for a in args]
  for p in procs:
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
  import numpy as np
  with np.load(out) as f:
    return dict(f)


@pytest.mark.slow
def test_eval_in_two_processes_equals_one_process_on_a_tensor_mesh(tmp_path):
  """2 processes x 4 devices (jax.distributed) against 1 x 8, data x fsdp x tensor = 2 x 2 x 2:
  each host feeds its own rows of every eval batch, the tensor axis spans hosts, and every
  host ends with the same embeddings and metrics."""
  import numpy as np
  one = _eval_worker(tmp_path / 'one.npz', 1, 8)
  two = _eval_worker(tmp_path / 'two.npz', 2, 4)
  assert one['image'].shape == (30, 32) and one['text'].shape == (120, 32)
  np.testing.assert_allclose(two['image'], one['image'], atol=1e-6)
  np.testing.assert_allclose(two['text'], one['text'], atol=1e-6)
  metrics = [k for k in one if k.startswith('metric/')]
  assert 'metric/rsum' in metrics
  assert {k: float(two[k]) for k in metrics} == pytest.approx({k: float(one[k]) for k in metrics}, abs=1e-6)


def test_streamed_eval_images_give_the_held_ones_metrics():
  """hold_images=False (decoded batch by batch at each eval) against the held uint8 sets, retrieval
  and zero-shot, on 8 devices: the same metrics."""
  from conftest import plan_of, setup_of
  from vlp import eval as eval_lib
  from vlp.core import parallel
  from vlp.data import tokenizer as tokenizer_lib, eval_set
  mesh = parallel.make_mesh({'data': 8})
  results = []
  for hold in (True, False):
    config = tiny_config(**{'data.eval_images': 20})
    config.evals.retrieval = config_lib.eval_config('retrieval', data='synthetic', num_images=20, batch_size=8,
                                                    hold_images=hold)
    config.evals.zs = config_lib.eval_config('zeroshot', data='synthetic', num_images=12, batch_size=8,
                                             hold_images=hold)
    plan, setup = plan_of(config, mesh), setup_of(config, mesh)
    evaluators = eval_lib.make(config, plan.recipe.predict_fns(setup.graphdef), tokenizer_lib.for_config(config))
    assert all(isinstance(ev.data['image'], eval_set.StreamedImages) != hold for _, _, ev in evaluators)
    results.append(eval_lib.run(evaluators, loop.fresh_state(plan, setup)['params']))
  assert {'retrieval/rsum', 'zs/acc1'} <= set(results[0])
  assert results[1] == pytest.approx(results[0], abs=1e-9)
