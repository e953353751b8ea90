"""Training end to end: sharding, exact resume, export, and clear errors."""
import os

import jax
import numpy as np
import pytest
from conftest import plan_of, setup_of, tiny_config, train_losses
from jax.sharding import PartitionSpec as P

from vlp import cli, export
from vlp.core import parallel
from vlp.core.pixels import normalize_image
from vlp.train import loop
from vlp.workdir import checkpoints, metrics as metrics_lib


def _losses(config, mesh, steps=3):
  return train_losses(config, mesh, steps)[:2]


def test_sharded_step_matches_single_device():
  assert jax.device_count() == 8
  config = tiny_config()
  one = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  eight = parallel.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  single, _ = _losses(config, one)
  sharded, state = _losses(config, eight)
  np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
  # FSDP really shards: an MLP kernel [32, 64] is split 4 ways over its 'embed' dim.
  kernel = state['params']['image']['encoder']['blocks'][0]['mlp']['fc1']['kernel']
  assert kernel.sharding.spec == P('fsdp', None)
  assert kernel.addressable_shards[0].data.shape == (8, 64)
  mu = state['opt_state'][1][0].mu['image']['encoder']['blocks'][0]['mlp']['fc1']['kernel']
  assert mu.sharding.spec == P('fsdp', None)  # optimizer state follows its parameter


def _train(workdir, **overrides):
  return loop.train(tiny_config(**overrides), str(workdir), progress=False)


def _logged_losses(workdir):
  return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(str(workdir)) if 'loss' in r}


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
def test_resume_continues_the_exact_trajectory(tmp_path):
  _train(tmp_path / 'straight', total_steps=6)
  _train(tmp_path / 'resumed', total_steps=3)  # stops after saving step 3
  _train(tmp_path / 'resumed', total_steps=6)  # resumes state + data iterator at step 3
  straight, resumed = _logged_losses(tmp_path / 'straight'), _logged_losses(tmp_path / 'resumed')
  assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
  assert [resumed[s] for s in range(1, 7)] == [straight[s] for s in range(1, 7)]  # bit for bit
  # log_every=3: the metrics of steps 1-3 and 4-6 come back in one transfer each, the same numbers
  sparse = _train(tmp_path / 'sparse', total_steps=6, log_every=3)
  assert sparse['time']['metric_reads'] == 2
  assert _logged_losses(tmp_path / 'sparse') == {3: straight[3], 6: straight[6]}


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
def test_export_gives_the_training_embeddings(tmp_path):
  result = _train(tmp_path / 'wd', total_steps=3)
  cli.main(['export', f'--workdir={tmp_path / "wd"}', f'--out={tmp_path / "export"}'])
  assert sorted(os.listdir(tmp_path / 'export')) == ['config.json', 'image_encoder.jax_exported', 'model.safetensors',
                                                     'text_encoder.jax_exported', 'tokenizer.model']
  model, tokenizer = export.load(str(tmp_path / 'export'))
  config, params, step = checkpoints.restore_params(str(tmp_path / 'wd'))
  assert step == 3
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  [(_, _, evaluator)] = loop.Evaluators(plan_of(config), setup_of(config, mesh), tokenizer).evaluators
  image_emb, text_emb = evaluator.embed(params)
  pixels = normalize_image(evaluator.data['image'][:8])  # the evaluator's are uint8, as the trainer's
  np.testing.assert_allclose(model.encode_image(pixels), image_emb[:8], atol=1e-5)
  np.testing.assert_allclose(model.encode_text(evaluator.data['text'][:8]), text_emb[:8], atol=1e-5)
  # bf16 weights: half the bytes, embeddings within bf16 rounding
  cli.main(['export', f'--workdir={tmp_path / "wd"}', f'--out={tmp_path / "bf16"}', '--dtype=bfloat16'])
  bf16, _ = export.load(str(tmp_path / 'bf16'))
  np.testing.assert_allclose(bf16.encode_image(pixels), image_emb[:8], atol=3e-2)
  # the same numbers as the eval at the end of training
  from vlp.eval.retrieval import recall_at_k
  again = recall_at_k(image_emb, text_emb, evaluator.data['text_to_image'])
  assert again['t2i@1'] == pytest.approx(result['retrieval/t2i@1'])


def _cli_error(capsys, argv):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_bad_input_gives_one_clear_error_line(tmp_path, capsys):
  cfg = os.path.join(os.path.dirname(__file__), '..', 'configs', 'align_tiny.py')
  wd = f'--workdir={tmp_path / "wd"}'
  line = _cli_error(capsys, ['train', f'--config={cfg}', wd, '--config.model.imag.width=64'])
  assert "unknown config key 'model.imag.width'" in line and 'model.image.width' in line
  line = _cli_error(capsys, ['train', f'--config={cfg}', wd, '--config.batch_size=100', '--config.mesh.data=8'])
  assert "'batch_size'" in line and 'not divisible' in line
  _train(tmp_path / 'wd', total_steps=3)
  line = _cli_error(capsys, ['train', f'--config={cfg}', wd])
  assert 'holds a checkpoint of another model' in line
  assert not os.path.exists(tmp_path / 'nothing')
  line = _cli_error(capsys, ['train', f'--config={tmp_path / "nothing.py"}', wd])
  assert 'does not exist' in line


def test_resume_refuses_another_data_stream(tmp_path):
  from vlp.checkpoint import WorkdirMismatch
  _train(tmp_path, total_steps=3)
  with pytest.raises(WorkdirMismatch, match='data.num_workers is 0 there, 1 here'):
    _train(tmp_path, total_steps=6, **{'data.num_workers': 1})
  with pytest.raises(WorkdirMismatch, match='another model .model.embed_dim is 32 there, 64 here'):
    _train(tmp_path, total_steps=6, **{'model.embed_dim': 64})


@pytest.fixture(scope='module')
def web_shards(tmp_path_factory):
  """img2dataset shards with a corrupt image and an empty caption in each, and their ArrayRecord."""
  import data_fixtures as fx
  from vlp.data import convert
  root = tmp_path_factory.mktemp('web')
  for s in range(2):
    samples = [fx.sample(s * 40 + i, caption=f'a photo number {i % 7}') for i in range(40)]
    samples[5]['image'], samples[9]['caption'] = b'junk', ''
    fx.write_shard(str(root / 'tars'), s, samples)
  convert.convert(convert.parse_convert_args([str(root / 'tars'), '--out', str(root / 'ar'),
                                              '--workers', '1', '--quiet']))
  return root


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
@pytest.mark.parametrize('name', ['webdataset', 'arrayrecord'])
def test_train_on_web_shards_counts_skips_and_resumes(tmp_path, web_shards, name):
  data = {'data.name': name, 'data.train': str(web_shards / ('tars' if name == 'webdataset' else 'ar')),
          'data.eval': str(web_shards / 'ar'), 'data.eval_images': 16, 'data.shuffle_window': 16}
  result = _train(tmp_path / 'wd', total_steps=3, **data)
  assert 'retrieval/t2i@1' in result
  logged = list(metrics_lib.read_jsonl(str(tmp_path / 'wd')))
  skipped = {k: sum(r.get(k, 0) for r in logged) for k in ('skipped/corrupt_image', 'skipped/empty_caption')}
  if name == 'webdataset':  # 3 steps x 16 of 76 usable: the bad ones of at least one shard were met
    assert skipped['skipped/corrupt_image'] >= 1 and skipped['skipped/empty_caption'] >= 1
  else:  # conversion dropped them already
    assert skipped == {'skipped/corrupt_image': 0, 'skipped/empty_caption': 0}
  _train(tmp_path / 'wd', total_steps=5, **data)  # resumes
  assert sorted(_logged_losses(tmp_path / 'wd')) == [1, 2, 3, 4, 5]


def test_resume_with_another_process_count_is_refused(tmp_path):
  from vlp.checkpoint import WorkdirMismatch
  _train(tmp_path, total_steps=3)
  data_dir = tmp_path / 'checkpoints' / '3' / 'data'
  assert 'process_0-of-1.json' in os.listdir(data_dir)
  # what the first of two processes would have written
  os.rename(data_dir / 'process_0-of-1.json', data_dir / 'process_0-of-2.json')
  with pytest.raises(WorkdirMismatch, match=r'positions of \[2\] process\(es\); this run has 1'):
    _train(tmp_path, total_steps=6)
