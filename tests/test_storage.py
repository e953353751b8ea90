"""Every path may be gs://: the path layer, data shards, and train -> checkpoint -> resume ->
eval -> export -> vlp.load_pretrained on a local GCS emulator (fake-gcs-server, reached
through STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL only), with nothing written locally."""
import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import tiny_config

import data_fixtures as fx
import gcs_emulator
import vlp
from vlp import cli, export
from vlp.core import paths
from vlp.data import arrayrecord, pipeline, tokenizer as tok, webdataset
from vlp.train import loop
from vlp.workdir import checkpoints, hosts as workdir_check, metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_path_layer_local_and_remote(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  root = f'gs://{gcs.bucket}/layer'
  assert paths.is_remote(root) and not paths.is_remote(str(tmp_path)) and not paths.is_remote('file:///x')
  assert paths.join(root, 'a', 'b.txt') == f'{root}/a/b.txt' and paths.abspath(root) == root
  paths.makedirs(paths.join(root, 'dir'))
  for i in range(3):
    paths.write_atomic(paths.join(root, f'{i:05d}.tar'), b'x' * i)
  assert paths.glob(f'{root}/{{00000..00001}}.tar') == [f'{root}/00000.tar', f'{root}/00001.tar']
  assert paths.glob(f'{root}/*.tar') == [f'{root}/{i:05d}.tar' for i in range(3)]
  assert paths.exists(f'{root}/00002.tar') and not paths.exists(f'{root}/nope')
  assert paths.read_bytes(f'{root}/00002.tar') == b'xx'
  with paths.open(f'{root}/t.txt', 'w') as f:
    f.write('hello')
  assert paths.read_text(f'{root}/t.txt') == 'hello'
  assert os.listdir(tmp_path) == []  # no ./gs:/... made locally
  # local paths through the same calls
  paths.write_atomic(str(tmp_path / 'l.txt'), 'a')
  assert paths.glob(str(tmp_path / '*.txt')) == [str(tmp_path / 'l.txt')] and paths.read_text(tmp_path / 'l.txt') == 'a'


def test_bad_remote_paths_are_one_line(gcs):
  with pytest.raises(ValueError, match=r"^'gs://vlp-test/none/\*\.tar' matches no file$"):
    webdataset.expand(f'gs://{gcs.bucket}/none/*.tar')
  with pytest.raises(paths.StorageError, match='bucket gs://no-such-bucket-x does not exist') as e:
    paths.check_reachable('gs://no-such-bucket-x/run', 'workdir')
  assert '\n' not in str(e.value) and 'GOOGLE_APPLICATION_CREDENTIALS' in str(e.value)
  config = tiny_config(**{'data.tokenizer': 'gs://no-such-bucket-y/sp.model'})
  with pytest.raises(paths.StorageError, match="config key 'data.tokenizer' gs://no-such-bucket-y/sp.model"):
    workdir_check.check_reachable(config, f'gs://{gcs.bucket}/run')


def test_unreachable_endpoint_is_one_line_within_the_timeout(gcs, monkeypatch):
  import gcsfs
  dead = gcs_emulator.Emulator()
  dead.port = gcs_emulator._free_port()  # nothing listens there
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', dead.url)
  gcsfs.GCSFileSystem.clear_instance_cache()
  try:
    t = time.time()
    with pytest.raises(paths.StorageError, match=r'workdir gs://vlp-test/run: (no answer|cannot access)') as e:
      paths.check_reachable('gs://vlp-test/run', 'workdir', timeout=3)
    assert time.time() - t < 10 and '\n' not in str(e.value)
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture
def remote_shards(gcs, tmp_path_factory):
  """4 webdataset shards and their ArrayRecord conversion, in the bucket."""
  local = tmp_path_factory.mktemp('shards')
  for s in range(4):
    fx.write_shard(str(local / 'tars'), s, [fx.sample(s * 5 + i, image=fx.jpeg(s * 5 + i, (40, 32))) for i in range(5)])
  recs = [r for r in webdataset.read_shards(webdataset.expand(str(local / 'tars')))]
  arrayrecord.write(str(local / 'ar' / 'all.array_record'), recs)
  root = f'gs://{gcs.bucket}/shards'
  for f in sorted(os.listdir(local / 'tars')):
    paths.copy(str(local / 'tars' / f), f'{root}/tars/{f}')
  paths.copy(str(local / 'ar' / 'all.array_record'), f'{root}/ar/all.array_record')
  return root, str(local)


def test_webdataset_and_arrayrecord_read_from_gcs(remote_shards):
  root, local = remote_shards
  shards = webdataset.expand(f'{root}/tars/{{00000..00003}}.tar')
  assert shards == [f'{root}/tars/{i:05d}.tar' for i in range(4)]
  assert webdataset.expand(f'{root}/tars') == shards  # a "directory" prefix
  remote = [r['key'] for r in webdataset.read_shards(shards)]
  assert remote == [r['key'] for r in webdataset.read_shards(webdataset.expand(f'{local}/tars'))] and len(remote) == 20
  prep = pipeline.Preprocess(tok.builtin_tokenizer(), 16, 24, train=True)
  it = iter(pipeline.stream_dataset(shards, webdataset.read_shard, prep, cycle_length=2, shuffle_window=4,
                                    batch_size=4, seed=0, process_index=0, process_count=1))
  batch = next(it)
  assert batch['image'].shape == (4, 24, 24, 3)
  assert arrayrecord.looks_like(f'{root}/ar')
  source = arrayrecord.Source(f'{root}/ar/*.array_record')
  assert len(source) == 20 and source[3]['key'] == remote[3]
  batch = next(iter(pipeline.train_dataset(source, prep, batch_size=4, seed=0, process_index=0, process_count=1)))
  assert batch['image'].shape == (4, 24, 24, 3)


def _local_files(root):
  return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


@pytest.mark.slow
def test_train_resume_eval_export_load_all_on_gcs(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir, out = f'gs://{gcs.bucket}/e2e/run', f'gs://{gcs.bucket}/e2e/export'
  tokenizer = f'gs://{gcs.bucket}/e2e/sp.model'
  paths.copy(tok.builtin_tokenizer().model_path, tokenizer)
  overrides = {'total_steps': 3, 'data.tokenizer': tokenizer, 'checkpoint.every': 3,
               'compile_cache': f'gs://{gcs.bucket}/e2e/xla'}
  loop.train(tiny_config(**overrides), workdir, progress=False)
  names = gcs.objects('e2e/run/')
  assert 'e2e/run/config.json' in names and 'e2e/run/metrics.jsonl' in names
  assert any(n.startswith('e2e/run/checkpoints/3/state/') for n in names)
  assert 'e2e/run/checkpoints/3/data/process_0-of-1.json' in names
  assert any(n.startswith('e2e/run/tb/events.out.tfevents') for n in names)
  assert any(n.startswith('e2e/xla/') for n in gcs.objects('e2e/xla/'))  # the compile cache, in the bucket
  result = loop.train(tiny_config(**{**overrides, 'total_steps': 6}), workdir, progress=False)  # resumes at 3
  assert sorted(r['step'] for r in metrics_lib.read_jsonl(workdir) if 'loss' in r) == list(range(1, 7))
  assert 'retrieval/i2t@1' in result
  assert cli.main(['eval', f'--workdir={workdir}']) == 0
  records = json.loads(paths.read_text(f'{workdir}/eval_6.json'))
  assert records and 'metrics' in records[0]
  export.export(workdir, out)
  enc = vlp.load_pretrained(out)
  e = enc.encode_text(['a red circle', 'a blue square'])
  assert e.shape == (2, 32) and np.allclose(np.linalg.norm(e, axis=-1), 1, atol=1e-5)
  img = enc.encode_image(np.zeros((2, 16, 16, 3), np.float32))
  assert img.shape == (2, 32)
  assert _local_files(tmp_path) == []  # nothing written locally


@pytest.fixture
def own_emulator(tmp_path):
  """An emulator of this test's own (on disk, so a restart serves the same objects), to stop and
  start: the session's stays up."""
  import gcsfs
  emu = gcs_emulator.start_or_skip(str(tmp_path / 'bucket'))
  restore = gcs_emulator.set_env(emu.env())
  gcsfs.GCSFileSystem.clear_instance_cache()
  yield emu
  restore()
  gcsfs.GCSFileSystem.clear_instance_cache()
  emu.stop()


@pytest.mark.slow
def test_metrics_the_storage_refuses_are_kept_and_uploaded_once_it_is_back(own_emulator, capsys):
  """metrics.jsonl on a bucket that goes away: the upload is refused after gcsfs's retries,
  the run is told in one line, and the lines go up with the next upload once it is back."""
  path = f'gs://{own_emulator.bucket}/run/metrics.jsonl'
  log = metrics_lib.RemoteLog(path, interval=0.0)
  log.write('{"step": 1}\n')
  log.flush()
  own_emulator.stop(kill=True)
  log.write('{"step": 2}\n')
  log.flush()  # refused: kept
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith(f'{path} could not be written') and 'next upload' in out[0], out
  own_emulator.start(port=own_emulator.port)
  log.close()
  assert paths.read_text(path) == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.slow
def test_a_shard_read_through_an_outage_loses_no_record_and_counts_the_retries(own_emulator, tmp_path, capsys):
  """The emulator is killed after the first records of a remote shard and comes back after 40 s
  (longer than gcsfs's own 30 s of retries): the reader waits, reopens at its offset, and every
  record comes out, as from the local copy, with the retries as notes."""
  import threading

  from vlp.data import records
  local = tmp_path / 'tars'
  # noise images: 40 members of 200 kB, beyond gcsfs's 5 MB read-ahead, so reading goes on after the kill
  rng = np.random.default_rng(0)
  fx.write_shard(str(local), 0, [fx.sample(i, image=rng.bytes(200_000)) for i in range(40)])
  shard = f'gs://{own_emulator.bucket}/tars/00000.tar'
  paths.copy(str(local / '00000.tar'), shard)
  reader = webdataset.read_shard(shard)
  out = [next(reader)]
  own_emulator.stop(kill=True)
  back = threading.Timer(40.0, lambda: own_emulator.start(port=own_emulator.port))
  back.start()
  t0 = time.monotonic()
  out += list(reader)
  back.join()
  assert time.monotonic() - t0 > 35  # it waited for the storage
  notes = [r for r in out if records.is_skipped(r)]
  assert notes and all(r[records.SKIP] == records.RETRIED for r in notes)
  expected = [(r['key'], r['image']) for r in webdataset.read_shard(str(local / '00000.tar'))]
  assert [(r['key'], r['image']) for r in out if not records.is_skipped(r)] == expected and len(expected) == 40
  err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('vlp: storage:')]
  assert len(err) == len(notes) and f'{shard}: ' in err[0] and 'retry 1 in' in err[0], err


def _objects_under(root: str, prefix: str) -> list[str]:
  """Object files the emulator's filesystem backend holds under `prefix` (read off its disk, so
  also while it is down)."""
  return [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
          if prefix in os.path.relpath(os.path.join(d, f), root)]


def _launch(workdir, env, log, cache, save_timeout_s=30):
  # no evaluator, and a local compile cache, so the relaunch compiles nothing
  return subprocess.Popen(
      [sys.executable, '-m', 'vlp.cli', 'train', f'--config={ROOT}/tests/tiny.py:noeval', f'--workdir={workdir}',
       '--no_progress', '--config.total_steps=6', '--config.checkpoint.every=2',
       f'--config.checkpoint.save_timeout_s={save_timeout_s}', f'--config.compile_cache={cache}'],
      env={**os.environ, **env, 'PYTHONPATH': ROOT, 'PYTHONFAULTHANDLER': '1'}, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def disk_emulator(tmp_path):
  """An emulator of this test's own serving tmp_path/bucket from disk (its objects readable while it
  is down, and served again when it restarts on the same port); the process environment untouched."""
  emu = gcs_emulator.start_or_skip(str(tmp_path / 'bucket'))
  yield emu
  emu.stop()


def _saving(emu, log_path, cache, step=4, **launch):
  """`vlp train` on the emulator's bucket (gs://BUCKET/run), returned once the first object of
  `step`'s save is written: the save is under way."""
  with open(log_path, 'w') as log:
    proc = _launch(f'gs://{emu.bucket}/run', emu.env(), log, cache, **launch)
  deadline = time.time() + 600
  while not _objects_under(emu.root, f'checkpoints/{step}') and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, log_path.read_text()[-3000:]
  return proc


@pytest.mark.slow
def test_bucket_gone_mid_save_is_one_line_and_a_relaunch_resumes_the_previous_checkpoint(tmp_path, disk_emulator):
  """The emulator is killed (SIGKILL) while the async save of step 4 is being written: the run
  stops with one line naming the step and the checkpoint that stays (not a hang, not a
  traceback); once the bucket is back, a relaunch resumes step 2 and finishes the run."""
  emu, log_path = disk_emulator, tmp_path / 'first.txt'
  workdir = f'gs://{emu.bucket}/run'
  proc = _saving(emu, log_path, str(tmp_path / 'xla'))
  emu.stop(kill=True)  # mid-save: the first of step 4's objects is written, the rest are not
  rc = proc.wait(timeout=300)
  text = log_path.read_text()
  errors = [line for line in text.splitlines() if line.startswith('vlp: error:')]
  assert rc == 2 and len(errors) == 1, text[-3000:]
  assert 'checkpoint of step 4 could not be written' in errors[0], errors
  assert 'the previous checkpoint (step 2) stays restorable' in errors[0], errors
  assert f'{ROOT}/vlp/cli.py' not in text, text[-3000:]  # no traceback out of vlp (the storage
  # libraries' own threads may log theirs)
  emu.start(port=emu.port)  # the bucket is back, with what it held
  with open(tmp_path / 'second.txt', 'w') as log:
    rc = _launch(workdir, emu.env(), log, str(tmp_path / 'xla')).wait(timeout=600)
  text = (tmp_path / 'second.txt').read_text()
  assert rc == 0 and re.search(r'^resumed step 2\b', text, re.M), text[-3000:]
  restore = gcs_emulator.set_env(emu.env())
  try:
    steps = [r['step'] for r in metrics_lib.read_jsonl(workdir) if 'loss' in r]
  finally:
    restore()
  # one trajectory: the relaunch's steps 3-6 follow what the first launch got written (step 2's
  # line, still buffered when the bucket went, is lost with it)
  assert steps[-4:] == [3, 4, 5, 6] and len(steps) == len(set(steps)), steps


@pytest.mark.slow
def test_a_save_through_an_outage_is_made_again_and_counted(tmp_path, disk_emulator):
  """The emulator is killed while step 4's save is being written and comes back 45 s later
  (past gcsfs's own 30 s of retries): vlp backs off and saves again, within
  checkpoint.save_timeout_s; the run finishes, counts the retries, and its checkpoints restore."""
  import threading
  emu, log_path = disk_emulator, tmp_path / 'log.txt'
  proc = _saving(emu, log_path, str(tmp_path / 'xla'), save_timeout_s=300)
  emu.stop(kill=True)
  back = threading.Timer(45.0, lambda: emu.start(port=emu.port))
  back.start()
  rc = proc.wait(timeout=600)
  back.join()
  text = log_path.read_text()
  assert rc == 0, text[-3000:]
  retries = [line for line in text.splitlines() if line.startswith('vlp: storage: checkpoint of step')]
  assert retries and 'retry 1 in' in retries[0], text[-3000:]
  restore = gcs_emulator.set_env(emu.env())
  try:
    times = [r for r in metrics_lib.read_jsonl(f'gs://{emu.bucket}/run') if 'time/checkpoint_save_retries' in r]
    assert times and times[-1]['time/checkpoint_save_retries'] == len(retries), (times, retries)
    assert checkpoints.restore_params(f'gs://{emu.bucket}/run')[2] == 6  # the last step restores
  finally:
    restore()


@pytest.mark.slow
def test_a_storage_call_stuck_on_an_outage_is_told_from_a_slow_one(own_emulator):
  """vlp.core.retry.watched: a call that has not returned once the storage went away and has answered
  again for `stall_after` seconds is Stalled (a save made again, afresh, goes through); a call
  that is only slow while the storage answers throughout is waited for up to its deadline (Hung)."""
  import threading
  from vlp.core import retry
  probe = f'gs://{own_emulator.bucket}/run'
  never = threading.Event()
  warnings = []
  threading.Timer(1.0, lambda: own_emulator.stop(kill=True)).start()
  back = threading.Timer(4.0, lambda: own_emulator.start(port=own_emulator.port))
  back.start()
  t0 = time.monotonic()
  with pytest.raises(retry.Stalled):
    retry.watched(never.wait, 120, warnings.append, probe, warn_after=3, stall_after=3, poll=0.5)
  back.join()
  assert 6 < time.monotonic() - t0 < 60 and warnings  # after the outage and 3 s of answers, not at the deadline
  assert retry.is_transient(retry.Stalled('x'))
  t0 = time.monotonic()
  with pytest.raises(retry.Hung) as e:
    retry.watched(never.wait, 6, warnings.append, probe, warn_after=100, stall_after=1, poll=0.5)
  assert not isinstance(e.value, retry.Stalled) and time.monotonic() - t0 >= 6
  assert retry.watched(lambda: 7, 5, warnings.append, probe) == 7
  never.set()


@pytest.mark.slow
def test_a_save_stuck_on_an_outage_is_made_again_by_a_fresh_manager(own_emulator, monkeypatch):
  """A save whose writer hangs on a dead connection (as Orbax's did when the emulator was killed
  mid-save and came back) is found Stalled once the storage answers again, and made again by a
  fresh Orbax manager: the step commits, restores, and the retry is counted."""
  import functools
  import threading

  import jax.numpy as jnp

  from vlp.core import retry
  monkeypatch.setattr(retry, 'watched', functools.partial(retry.watched, stall_after=3, poll=0.5))
  cfg = tiny_config(**{'checkpoint.save_timeout_s': 120}).checkpoint
  ckpt = checkpoints.manager(f'gs://{own_emulator.bucket}/stuck', cfg)
  stuck = threading.Event()
  ckpt.manager.save = lambda *args, **kwargs: stuck.wait()  # the first manager's writer never returns
  threading.Timer(1.0, lambda: own_emulator.stop(kill=True)).start()
  back = threading.Timer(4.0, lambda: own_emulator.start(port=own_emulator.port))
  back.start()
  state = {'w': jnp.arange(6.0)}
  assert ckpt.save(2, state, force=True)
  back.join()
  ckpt.finish(2, state)
  assert ckpt.save_retries == 1 and ckpt.all_steps() == [2]
  step, restored = ckpt.newest_restorable({'w': jax.ShapeDtypeStruct((6,), jnp.float32)})
  assert step == 2 and np.array_equal(restored['w'], np.arange(6.0))
  ckpt.close()
  stuck.set()


@pytest.mark.slow
def test_a_run_killed_while_it_saves_to_object_storage_resumes(tmp_path, disk_emulator):
  """`kill -9` of `vlp train` while step 4's save is being written to the bucket: the relaunch
  resumes the newest step that was committed (2, or 4 if its commit got through), step 4's
  half-written objects get in nobody's way, and the run ends with one trajectory."""
  emu, workdir = disk_emulator, f'gs://{disk_emulator.bucket}/run'
  proc = _saving(emu, tmp_path / 'first.txt', str(tmp_path / 'xla'))
  proc.kill()  # SIGKILL, mid-save
  proc.wait()
  with open(tmp_path / 'second.txt', 'w') as log:
    rc = _launch(workdir, emu.env(), log, str(tmp_path / 'xla')).wait(timeout=600)
  text = (tmp_path / 'second.txt').read_text()
  resumed = re.search(r'^resumed step (\d+)', text, re.M)
  assert rc == 0 and resumed and int(resumed.group(1)) in (2, 4), text[-3000:]
  restore = gcs_emulator.set_env(emu.env())
  try:
    steps = [r['step'] for r in metrics_lib.read_jsonl(workdir) if 'loss' in r]
    assert steps[-1] == 6 and steps == sorted(set(steps)), steps  # one trajectory
    assert checkpoints.restore_params(workdir)[2] == 6
  finally:
    restore()
