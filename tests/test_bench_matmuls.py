"""The matmul-only floor of `vlp bench matmuls`."""
import json
import os

import pytest

from vlp import cli
from vlp.bench import matmuls
from vlp.core import config_files
from vlp.recipes.align import flops as align_flops
from conftest import tiny_config

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


@pytest.mark.parametrize('cfg', [tiny_config(), config_files.load(os.path.join(CONFIGS, 'bench_tiny.py'))])
def test_listed_matmuls_are_the_analytic_model_flops(cfg):
  mms = matmuls.step_matmuls(cfg.model, cfg.batch_size)
  assert 3 * sum(m.forward_flops for m in mms) == pytest.approx(
      align_flops.train_flops(cfg.model, cfg.batch_size), rel=1e-12)
  # each tower layer has its six matmuls
  assert sum(m.name == 'image.mlp_in' for m in mms) == cfg.model.image.depth
  assert sum(m.name == 'text.scores' for m in mms) == cfg.model.text.depth


def test_cli_prints_the_floor(capsys):
  cli.main(['bench', 'matmuls', '--config=' + os.path.join(CONFIGS, 'bench_tiny.py'),
            '--config.batch_size=8', '--config.model.image.image_size=16',
            '--config.model.image.depth=1', '--config.model.text.depth=1'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['matmul_only_ms'] > 0
  assert out['examples_per_sec_ceiling'] == pytest.approx(8 / out['matmul_only_ms'] * 1e3)
  assert sum(out['ms_by_matmul'].values()) == pytest.approx(out['matmul_only_ms'], abs=0.1)
  assert set(out['ms_by_matmul']) >= {'image.qkv', 'text.mlp_out', 'logits', 'image.patch_embed'}
