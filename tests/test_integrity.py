"""Checkpoint integrity: real Orbax checkpoints of a tiny run, damaged (a truncated file, a
deleted file, no commit marker): a resume reports the latest in one line and takes the newest
intact step; `vlp train --step` onto a damaged step fails in one line; a torn metrics line
does not stop a resume."""
import json
import os
import re
import shutil

import jax
import pytest
from conftest import tiny_config

from vlp import checkpoint, cli, plan as plan_lib
from vlp.core import parallel
from vlp.data import tokenizer as tokenizer_lib
from vlp.train import input as input_lib, loop, state as state_lib
from vlp.workdir import checkpoints, layout, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {'total_steps': 6, 'checkpoint.every': 2, 'checkpoint.keep': 3}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with the checkpoints of steps 2, 4 and 6, and the compile cache the CLI test reuses."""
  root = tmp_path_factory.mktemp('trained')
  loop.train(tiny_config(compile_cache=str(root / 'cache'), **OVERRIDES), str(root / 'run'), progress=False)
  return root


def _copy(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained / 'run', workdir)
  return workdir


def _resume(workdir):
  """(step, state) as `vlp train` resumes: the latest intact step, with the input position."""
  config = tiny_config(**OVERRIDES)
  plan = plan_lib.make(config, jax.device_count())
  setup = state_lib.make_setup(plan, parallel.make_mesh(plan.sizes))
  it = input_lib.train_iterator(plan, tokenizer_lib.for_config(config), plan.variants[0])
  try:
    return checkpoints.manager(workdir, config.checkpoint).resume(None, setup.abstract, {'data': it})
  finally:
    it.close()


def _state_files(workdir, step):
  """The files of the step's arrays (OCDBT data; a restore need not read every one)."""
  d = os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd')
  return [os.path.join(d, n) for n in os.listdir(d)]


def _damage(workdir, how, step):
  ckpts = os.path.join(workdir, 'checkpoints')
  if how == 'truncated':
    for path in _state_files(workdir, step):  # as a copy or upload cut short leaves them
      with open(path, 'r+b') as f:
        f.truncate(10)
  elif how == 'deleted':
    os.remove(os.path.join(ckpts, str(step), 'data', 'process_0-of-1.json'))
  else:  # the commit marker: the step never finished
    os.remove(os.path.join(ckpts, str(step), checkpoint.COMMIT_MARKER))


WHY = {'truncated': r'\(ValueError: OUT_OF_RANGE: Error reading ".*"',
       'deleted': r'\(ValueError: File .*process_0-of-1.json does not exist',
       'uncommitted': r'\(no commit_success.txt: a partial commit\)'}


@pytest.mark.slow
@pytest.mark.parametrize('how', ['truncated', 'deleted', 'uncommitted'])
def test_a_damaged_latest_step_is_reported_and_the_newest_intact_one_resumed(trained, tmp_path, capsys, how):
  workdir = _copy(trained, tmp_path)
  _damage(workdir, how, 6)
  step, state = _resume(workdir)
  assert step == 4 and int(state['step']) == 4
  lines = [line for line in capsys.readouterr().out.splitlines() if 'does not restore' in line]
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'checkpoint step 6 in {workdir}/checkpoints does not restore ')
  assert lines[0].endswith('; resuming step 4')
  assert re.search(WHY[how], lines[0]), lines[0]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert os.listdir(os.path.join(workdir, layout.CORRUPT)) == ['6']  # set aside, not deleted


@pytest.mark.slow
def test_every_damaged_step_is_skipped_and_the_run_goes_on_saving(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  _damage(workdir, 'truncated', 6)
  _damage(workdir, 'uncommitted', 4)
  loop.train(tiny_config(compile_cache=str(trained / 'cache'), **OVERRIDES), workdir, progress=False)
  out = capsys.readouterr().out
  assert 'checkpoint step 6' in out and 'resuming step 4' in out
  assert 'checkpoint step 4' in out and 'resuming step 2' in out and 'resumed step 2' in out
  ckpt = checkpoints.manager(workdir, tiny_config().checkpoint, read_only=True)
  assert ckpt.all_steps() == [2, 4, 6]  # steps 4 and 6 saved again, over the ones set aside
  assert sorted(os.listdir(os.path.join(workdir, layout.CORRUPT))) == ['4', '6']


@pytest.mark.slow
def test_train_onto_a_damaged_step_fails_in_one_line(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  _damage(workdir, 'truncated', 4)
  rc = cli.main(['train', f'--config={ROOT}/tests/tiny.py', f'--workdir={workdir}', '--step=4', '--no_progress',
                 f'--config.compile_cache={trained / "cache"}', *(f'--config.{k}={v}' for k, v in OVERRIDES.items())])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2
  assert len(err) == 1 and err[0].startswith(f'vlp: error: --step=4: checkpoint step 4 in {workdir}/checkpoints '
                                             'does not restore (ValueError: OUT_OF_RANGE'), err
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']  # nothing deleted


def test_a_metrics_line_cut_by_a_kill_does_not_stop_a_resume(tmp_path):
  lines = [json.dumps({'step': s, 'loss': 1.0 / s}) + '\n' for s in range(1, 6)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(lines) + '{"step": 6, "lo')
  writer = metrics_lib.MetricWriter(str(tmp_path), resume_step=4)
  writer.write(5, {'loss': 0.5})
  writer.close()
  assert [(r['step'], r['loss']) for r in metrics_lib.read_jsonl(str(tmp_path))] == \
      [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (5, 0.5)]


@pytest.mark.slow
def test_eval_and_export_read_the_newest_intact_step_and_move_nothing(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  _damage(workdir, 'truncated', 6)
  assert cli.main(['eval', f'--workdir={workdir}', f'--json={tmp_path / "eval.json"}']) == 0
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if 'does not restore' in line]
  assert len(lines) == 1 and lines[0].startswith(f'checkpoint step 6 in {workdir}/checkpoints does not restore '
                                                 '(ValueError: OUT_OF_RANGE') and lines[0].endswith('; using step 4')
  assert json.loads((tmp_path / 'eval.json').read_text())[0]['step'] == 4
  assert cli.main(['export', f'--workdir={workdir}', f'--out={tmp_path / "export"}']) == 0
  assert json.loads((tmp_path / 'export' / 'config.json').read_text())['step'] == 4
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']  # a reader moves nothing
  assert not os.path.exists(os.path.join(workdir, layout.CORRUPT))


def _bytes_read():
  """Bytes this process has read through the OS so far (Linux: /proc/self/io rchar)."""
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar')).split()[1])


@pytest.mark.skipif(not os.path.exists('/proc/self/io'), reason='counts reads through /proc/self/io')
def test_a_reader_of_the_params_leaves_the_optimizer_state_unread(tmp_path):
  # towers of width 128, so the arrays (4.4 MB of params), not Orbax's metadata, make the bytes read
  config = tiny_config(**{'model.image.width': 128, 'model.image.mlp_dim': 512, 'model.text.width': 128,
                          'model.text.mlp_dim': 512, 'model.text.vocab_size': 4096})
  plan = plan_lib.make(config, jax.device_count())
  setup = state_lib.make_setup(plan, parallel.make_mesh(plan.sizes))
  state = state_lib.init_state(plan, setup)
  # moments as after training (zeros would compress to nothing and cost no reading)
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state['opt_state']))))
  state['opt_state'] = jax.tree.map(
      lambda x: jax.random.normal(next(keys), x.shape, x.dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
      else x, state['opt_state'])
  saver = checkpoints.manager(str(tmp_path), config.checkpoint)
  saver.save(1, state, force=True)
  saver.wait()
  saver.close()
  read, restored = {}, {}
  for name, part in [('whole', setup.abstract), ('params', {'params': setup.abstract['params']})] * 2:  # 2nd: warm
    ckpt = checkpoints.manager(str(tmp_path), config.checkpoint, read_only=True)
    before = _bytes_read()
    restored[name] = ckpt.restore(1, part)
    read[name] = _bytes_read() - before
    ckpt.close()
  assert set(restored['params']) == {'params'}
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()),
                                   restored['params']['params'], restored['whole']['params']))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract['params']))
  # Adam keeps two moments per param: the whole state holds 3x the params' bytes
  assert read['params'] < 1.2 * param_bytes < read['whole'] - 1.5 * param_bytes, (read, param_bytes)
