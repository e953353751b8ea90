"""config.evals in training and in `vlp eval`: results JSON, tables, the plot."""
import json
import os

import pytest
from conftest import tiny_config

from vlp import cli, config as config_lib
from vlp.train import loop, metrics as metrics_lib


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
