"""Training input over web shards: streamed tars and ArrayRecord, deterministic and resumable."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import vlp
import data_fixtures as fx
from vlp.data import arrayrecord, pipeline, records, streaming, tokenizer as tok, webdataset

N_SHARDS, PER_SHARD = 4, 6
# The pipelines of these tests, also built in a new process by the resume test.
BUILD = textwrap.dedent('''
    from vlp.data import arrayrecord, pipeline, tokenizer, webdataset

    def build(kind, path, seed=0, process_index=0, process_count=1):
      prep = pipeline.Preprocess(tokenizer.builtin_tokenizer(), 16, 24, train=True)
      common = dict(batch_size=4, seed=seed, process_index=process_index, process_count=process_count)
      if kind == 'webdataset':
        return pipeline.stream_dataset(webdataset.expand(path), webdataset.read_shard, prep,
                                       cycle_length=2, shuffle_window=8, **common)
      return pipeline.train_dataset(arrayrecord.Source(path), prep, **common)
''')
exec(BUILD)  # defines build() here exactly as in the new process


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Shards whose captions name the example ('photo number N'), with one corrupt image each."""
  root = tmp_path_factory.mktemp('web')
  shards = str(root / 'tars')
  for s in range(N_SHARDS):
    samples = [fx.sample(s * PER_SHARD + i, image=fx.jpeg(s * PER_SHARD + i, (48, 40))) for i in range(PER_SHARD)]
    samples[3]['image'] = b'junk'
    fx.write_shard(shards, s, samples)
  ar = str(root / 'ar')
  for path in webdataset.expand(shards):
    recs = [r for r in webdataset.read_shard(path) if not records.is_skipped(r)]
    arrayrecord.write(os.path.join(ar, os.path.basename(path)[:-4] + arrayrecord.SUFFIX), recs)
  return {'webdataset': shards, 'arrayrecord': ar}


def _numbers(batch, t=tok.builtin_tokenizer()):
  return [int(t.decode(x).split()[-1]) for x in batch['text']]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


KINDS = ['webdataset', 'arrayrecord']


@pytest.mark.parametrize('kind', KINDS)
def test_same_seed_same_batches(data, kind):
  a = _take(iter(build(kind, data[kind])), 5)
  b = _take(iter(build(kind, data[kind])), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['text'], y['text'])
  other = _take(iter(build(kind, data[kind], seed=1)), 5)
  assert [_numbers(x) for x in a] != [_numbers(x) for x in other]


def test_stream_epoch_has_every_usable_example_once_and_counts_the_bad(data):
  # 4 shards x (6 - 1 corrupt) = 20 usable = 5 batches
  batches = _take(iter(build('webdataset', data['webdataset'])), 5)
  numbers = [n for b in batches for n in _numbers(b)]
  assert sorted(numbers) == [s * PER_SHARD + i for s in range(N_SHARDS) for i in range(PER_SHARD) if i != 3]
  assert sum(b['skipped'].get('corrupt_image', 0) for b in batches) == N_SHARDS


@pytest.mark.parametrize('kind', KINDS)
def test_two_processes_read_disjoint_shares_covering_the_data(data, kind):
  shares = []
  for pi in range(2):
    batches = _take(iter(build(kind, data[kind], process_index=pi, process_count=2)), 2)  # 10 usable each
    shares.append([n for b in batches for n in _numbers(b)][:8])
  assert not set(shares[0]) & set(shares[1])
  if kind == 'webdataset':  # whole shards per process: 0 and 2 to the first, 1 and 3 to the second
    assert {n // PER_SHARD for n in shares[0]} == {0, 2} and {n // PER_SHARD for n in shares[1]} == {1, 3}


def _fake_read(path, n=None):
  """Records of a made-up shard 's<index>-<records>': keys '<path>/<row>'."""
  for i in range(int(path.split('-')[1]) if n is None else n):
    yield {'key': f'{path}/{i}'}


def _reader_iterators(paths, processes, workers, **kw):
  """Every (process, worker) reader's iterator, as Grain's worker processes slice the dataset."""
  import copy
  from grain._src.python.dataset.transformations import prefetch
  out = {}
  for p in range(processes):
    ds = streaming.shard_stream(paths, _fake_read, seed=0, process_index=p, process_count=processes, **kw)
    for w in range(workers):
      worker_ds = copy.deepcopy(ds)
      prefetch._set_slice_iter_dataset(worker_ds, slice(w, None, workers))
      out[p, w] = iter(worker_ds)
  return out


def test_more_readers_than_shards_split_the_shards_by_rows():
  # 3 shards of 7 records for 2 processes x 4 workers: each shard in 3 parts by rows (9 parts, 8 readers)
  paths = [f's{i}-7' for i in range(3)]
  readers = _reader_iterators(paths, 2, 4, cycle_length=2, shuffle_window=1)
  seen = []
  for (p, w), it in readers.items():
    parts = streaming.reader_parts(3, p + 2 * w, 8)
    assert parts and all(k == 3 for _, (j, k) in parts)
    seen += [next(it)['key'] for _ in range(sum(len(range(j, 7, k)) for _, (j, k) in parts))]  # one pass
  assert sorted(seen) == sorted(f'{p}/{i}' for p in paths for i in range(7))  # every record once


def test_emulated_hosts_and_workers_never_repeat_a_record_within_a_global_batch():
  # 8 hosts x 4 Grain workers = 32 readers over 12 shards of 40 records (split by rows); a host batch
  # of 8 comes from one worker, the workers taking turns: 24 global batches of 64, every reader
  # going round its 13 to 27 records 2 to 3 times. (Before: the workers of a host shared its
  # repeated shard list and seed; each opened the same shards in several of its 4 slots.)
  hosts, workers, batch = 8, 4, 8
  readers = _reader_iterators([f's{i}-40' for i in range(12)], hosts, workers, cycle_length=4, shuffle_window=1)
  duplicates = []
  for t in range(24):
    keys = [next(readers[p, t % workers])['key'] for p in range(hosts) for _ in range(batch)]
    duplicates.append(len(keys) - len(set(keys)))
  assert duplicates == [0] * 24, duplicates


def test_a_shuffle_window_beyond_a_readers_records_is_refused():
  readers = _reader_iterators([f's{i}-10' for i in range(4)], 1, 2, cycle_length=2, shuffle_window=50)
  with pytest.raises(ValueError, match=r'reader 1 of 2 .* 20 records per pass: a record comes again about 20 .*'
                     r'shuffle_window=50'):
    next(readers[0, 1])


def test_changed_shard_list_is_refused_on_restore(data):
  it = iter(build('webdataset', data['webdataset']))
  _take(it, 2)
  state = it.get_state()
  others = iter(pipeline.stream_dataset(webdataset.expand(data['webdataset'])[::-1], webdataset.read_shard,
                                        pipeline.Preprocess(tok.builtin_tokenizer(), 16, 24), batch_size=4,
                                        seed=0, cycle_length=2, shuffle_window=8))
  with pytest.raises(ValueError, match='shard list or its order changed'):
    others.set_state(state)
    next(others)


@pytest.mark.parametrize('kind,num_workers', [('webdataset', 0), ('webdataset', 2), ('arrayrecord', 2)])
def test_resume_in_a_new_process(data, tmp_path, kind, num_workers):
  iterator = pipeline.make_iterator(build(kind, data[kind]), num_workers, prefetch=2)
  _take(iterator, 3)
  state = json.dumps(iterator.get_state())
  expected = _take(iterator, 7)  # past the end of the first epoch (5 batches)
  iterator.close()
  script = BUILD + textwrap.dedent('''
      import json, sys
      import numpy as np
      from vlp.data import pipeline
      if __name__ == '__main__':
        kind, path, num_workers, state, out = sys.argv[1:]
        iterator = pipeline.make_iterator(build(kind, path), int(num_workers), prefetch=2)
        iterator.set_state(json.loads(state))
        batches = [next(iterator) for _ in range(7)]
        iterator.close()
        np.savez(out, **{f'{k}{i}': b[k] for i, b in enumerate(batches) for k in ('image', 'text')})
  ''')
  out = tmp_path / 'batches.npz'
  root = os.path.dirname(os.path.dirname(vlp.__file__))
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([root, os.environ.get('PYTHONPATH', '')])}
  subprocess.run([sys.executable, '-c', script, kind, data[kind], str(num_workers), state, str(out)],
                 check=True, env=env, timeout=180)
  with np.load(out) as f:
    for i, batch in enumerate(expected):
      np.testing.assert_array_equal(f[f'image{i}'], batch['image'])
      np.testing.assert_array_equal(f[f'text{i}'], batch['text'])


def test_shard_iterator_resumes_at_the_next_record(data):
  path = webdataset.expand(data['webdataset'])[0]
  it = streaming.ShardIterator(path, webdataset.read_shard)
  _take(it, 4)
  state = it.get_state()
  rest = [r['key'] for r in it]
  again = streaming.ShardIterator(path, webdataset.read_shard)
  again.set_state(state)
  assert [r['key'] for r in again] == rest == [f'00000{i:04d}' for i in range(4, PER_SHARD)]


def test_all_skipped_stops_with_a_clear_error(tmp_path):
  shards = str(tmp_path / 'bad')
  fx.write_shard(shards, 0, [fx.sample(i, image=b'junk') for i in range(5)])
  ds = pipeline.stream_dataset(webdataset.expand(shards), webdataset.read_shard,
                               pipeline.Preprocess(tok.builtin_tokenizer(), 16, 24), batch_size=4, seed=0,
                               shuffle_window=1)
  with pytest.raises(pipeline.NoUsableData, match='corrupt_image'):
    next(iter(ds))


def _keys(iterator, n):
  return [next(iterator)['key'] for _ in range(n)]


def test_interleave_takes_shards_in_turn_and_resumes_mid_cycle(data):
  # 4 shards of 6 records, 2 open at a time, no shuffle window: records
  # alternate between two shards, and a shard that ends makes way for the next.
  paths = webdataset.expand(data['webdataset'])
  it = iter(streaming.shard_stream(paths, webdataset.read_shard, seed=0, cycle_length=2, shuffle_window=1))
  keys = _keys(it, 3 * PER_SHARD)
  shard_of = [int(k[:5]) for k in keys]
  first, second = shard_of[0], shard_of[1]
  assert first != second
  assert shard_of[:2 * PER_SHARD] == [first, second] * PER_SHARD
  assert sorted(keys[:2 * PER_SHARD]) == sorted(f'{s:05d}{i:04d}' for s in (first, second) for i in range(PER_SHARD))
  assert len(set(shard_of[2 * PER_SHARD:])) == 2 and not set(shard_of[2 * PER_SHARD:]) & {first, second}
  # a state taken mid-shard resumes on the same shards at the same records
  it = iter(streaming.shard_stream(paths, webdataset.read_shard, seed=0, cycle_length=2, shuffle_window=1))
  _keys(it, 7)
  state = it.get_state()
  again = iter(streaming.shard_stream(paths, webdataset.read_shard, seed=0, cycle_length=2, shuffle_window=1))
  again.set_state(state)
  assert _keys(again, len(keys) - 7) == keys[7:]
  with pytest.raises(ValueError, match='cycle_length changed'):
    iter(streaming.shard_stream(paths, webdataset.read_shard, seed=0, cycle_length=3,
                                shuffle_window=1)).set_state(state)


def test_only_empty_shards_is_a_clear_error(tmp_path):
  import tarfile
  for i in range(2):
    tarfile.open(tmp_path / f'{i:05d}.tar', 'w').close()
  it = iter(streaming.shard_stream(webdataset.expand(str(tmp_path)), webdataset.read_shard, seed=0))
  with pytest.raises(ValueError, match='every shard .* of this reader is empty'):
    next(it)


def test_storage_retry_notes_are_counted_apart_from_the_skips():
  import grain
  example = {'image': np.zeros((2, 2, 3), np.float32), 'text': np.zeros(4, np.int32)}
  stream = [records.retried('a'), records.retried('a'), example, records.skipped('b', 'corrupt_image'), example]
  batches = iter(pipeline.SkipCountingBatch(grain.MapDataset.source(stream).to_iter_dataset(),
                                            batch_size=2, max_skips=1))  # the notes are not skips
  batch = next(batches)
  assert batch['skipped'] == {records.RETRIED: 2, 'corrupt_image': 1} and batch['image'].shape == (2, 2, 2, 3)
