"""`vlp data convert` and `vlp data check` on img2dataset shards full of web junk."""
import json
import os

import pytest

import data_fixtures as fx
from vlp import cli
from vlp.data import arrayrecord, convert, records

# Shard 0: every kind of bad entry next to good ones; shard 1: good, then cut off.
GOOD = (0, 3, 8)
BAD = {1: 'corrupt_image', 2: 'corrupt_image', 4: 'missing_caption', 5: 'empty_caption',
       6: 'bad_utf8', 7: 'decompression_bomb'}


def _shard0():
  truncated_jpeg = fx.jpeg(2, (64, 48))[:300]
  samples = {1: fx.sample(1, image=b'\xff\xd8\xff\xe0 not really a jpeg'), 2: fx.sample(2, image=truncated_jpeg),
             5: fx.sample(5, caption='  \n '), 6: fx.sample(6, caption=b'\xff\xfe bad bytes'),
             7: fx.sample(7, image=fx.png_bomb())}
  return [samples.get(i, fx.sample(i)) for i in range(9)]


@pytest.fixture
def shards(tmp_path):
  d = str(tmp_path / 'laion')
  fx.write_shard(d, 0, _shard0(), no_caption=(4,), failed=3)
  cut = fx.write_shard(d, 1, [fx.sample(10 + i, image=fx.jpeg(i, (300, 200))) for i in range(4)], failed=1)
  fx.truncate(cut, 0.6)
  return d


def _key(shard, i):
  return f'{shard:05d}{i:04d}'


def _run_cli(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_convert_keeps_the_good_and_counts_the_bad_by_reason(shards, tmp_path, capsys):
  out_dir = str(tmp_path / 'ar')
  code, out, _ = _run_cli(capsys, 'data', 'convert', f'{shards}/{{00000..00001}}.tar', '--out', out_dir,
                          '--workers', '1', '--quiet')
  assert code == 0
  summary = json.loads(out.strip().splitlines()[-1])
  cut_kept = len(arrayrecord.Source(os.path.join(out_dir, '00001.array_record')))
  assert 0 < cut_kept < 4
  assert summary['kept'] == len(GOOD) + cut_kept
  with open(os.path.join(out_dir, convert.SUMMARY)) as f:
    files = json.load(f)['files']
  shard0, shard1 = (next(v for k, v in files.items() if k.endswith(f'0000{i}.tar')) for i in (0, 1))
  expected = {}
  for reason in BAD.values():
    expected[reason] = expected.get(reason, 0) + 1
  assert shard0['skipped'] == expected
  # the cut shard: the end is lost (and the key cut between its .jpg and .txt, if the cut fell there)
  assert shard1['skipped'] in ({'truncated_shard': 1}, {'truncated_shard': 1, 'missing_caption': 1})
  assert sum(summary['skipped'].values()) == len(BAD) + sum(shard1['skipped'].values())
  # the output holds exactly the good records of shard 0, as read, image bytes unchanged
  src = arrayrecord.Source(os.path.join(out_dir, '00000.array_record'))
  got = [src[i] for i in range(len(src))]
  assert [r['key'] for r in got] == [_key(0, i) for i in GOOD]
  assert [r['image'] for r in got] == [fx.jpeg(i) for i in GOOD]
  assert got[1]['caption'] == 'a photo number 3' and got[1]['url'] == f'https://example.com/{_key(0, 3)}.jpg'
  # the summary file names every skipped key
  assert sorted(map(tuple, shard0['skipped_keys'])) == sorted((_key(0, i), r) for i, r in BAD.items())


def test_parallel_conversion_gives_the_same_files(shards, tmp_path, capsys):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  for out, workers in ((one, '1'), (two, '2')):
    assert cli.main(['data', 'convert', f'{shards}/*.tar', '--out', out, '--workers', workers, '--quiet']) == 0
  for name in ('00000.array_record', '00001.array_record'):
    with open(os.path.join(one, name), 'rb') as a, open(os.path.join(two, name), 'rb') as b:
      assert a.read() == b.read()


def test_convert_filters_on_similarity_and_laion_metadata(tmp_path, capsys):
  d = str(tmp_path / 'laion')
  fx.write_shard(d, 0, [fx.sample(i, similarity=s) for i, s in enumerate((0.2, 0.35, 0.3))])
  # punsafe from the LAION metadata parquet, joined by URL
  meta = fx.write_laion_metadata(str(tmp_path / 'meta.parquet'), [
      {'URL': f'https://example.com/{_key(0, i)}.jpg', 'TEXT': 'x', 'punsafe': p}
      for i, p in enumerate((0.0, 0.9, 0.1))])
  out = str(tmp_path / 'ar')
  code, stdout, _ = _run_cli(capsys, 'data', 'convert', f'{d}/00000.tar', '--out', out, '--workers', '1',
                             '--min_similarity', '0.28', '--metadata', meta, '--max_punsafe', '0.5', '--quiet')
  assert code == 0
  assert json.loads(stdout)['skipped'] == {'low_similarity': 1, 'unsafe': 1}
  src = arrayrecord.Source(out)
  assert [src[i]['key'] for i in range(len(src))] == [_key(0, 2)]


def test_convert_glob_matching_nothing_is_a_clear_error(tmp_path, capsys):
  code, _, err = _run_cli(capsys, 'data', 'convert', str(tmp_path / 'laion-*.tar'), '--out', str(tmp_path / 'o'))
  assert code == 2
  assert err.strip() == f"vlp: error: '{tmp_path / 'laion-*.tar'}' matches no file"


def test_check_reports_every_bad_entry_by_key(shards, capsys):
  code, out, _ = _run_cli(capsys, 'data', 'check', f'{shards}/00000.tar', '--json')
  assert code == 0
  report = json.loads(out)
  assert report['records'] == 9 and report['usable'] == len(GOOD)
  assert sorted((b['key'], b['reason']) for b in report['bad']) == sorted(
      (_key(0, i), r) for i, r in BAD.items())
  assert report['download'] == {'count': 12, 'successes': 9, 'failed_to_download': 3, 'failed_to_resize': 0}
  # captions of the good ones are 'a photo number N': 3 words
  assert report['caption_words'] == {'<=5': len(GOOD)}
  # the human-readable form names the keys too
  code, out, _ = _run_cli(capsys, 'data', 'check', f'{shards}/00000.tar')
  assert f'bad {_key(0, 7)}: decompression_bomb' in out
  assert '9 records, 3 usable' in out


def test_check_arrayrecord_output_is_all_usable(shards, tmp_path, capsys):
  out = str(tmp_path / 'ar')
  assert cli.main(['data', 'convert', f'{shards}/00000.tar', '--out', out, '--workers', '1', '--quiet']) == 0
  capsys.readouterr()
  report = convert.check(out)
  assert (report['records'], report['usable'], report['bad']) == (len(GOOD), len(GOOD), [])
  assert 'download' not in report


def test_check_truncated_shard(shards):
  report = convert.check(os.path.join(shards, '00001.tar'))
  assert report['bad_by_reason'].get('truncated_shard') == 1
  assert report['records'] == report['usable'] + len(report['bad'])


def test_verify_passes_skipped_records_through():
  recs = [records.skipped('a', 'bad_utf8'), records.make('b', fx.jpeg(0), 'ok'), records.make('c', b'xx', 'ok')]
  out = list(convert.verify(iter(recs), max_pixels=10**8))
  assert [r.get(records.SKIP) for r in out] == ['bad_utf8', None, 'corrupt_image']


def test_convert_wit_with_pixel_files(tmp_path, capsys):
  rows = [fx.wit_row(i, language=lang) for i, lang in enumerate(('en', 'de', 'fr', 'en'))]
  tsv = fx.write_wit_tsv(str(tmp_path / 'wit_v1.train.all-00000-of-00010.tsv.gz'), rows)
  url = lambda i: fx.wit_row(i)['image_url']
  pixels = fx.write_pixel_file(str(tmp_path / 'image_pixels_0.tsv.gz'),
                               [(url(0), fx.jpeg(0)), (url(1), fx.jpeg(1)), (url(3), b'not an image')])
  out = str(tmp_path / 'ar')
  code, stdout, _ = _run_cli(capsys, 'data', 'convert', '--wit', tsv, '--wit_pixels', pixels,
                             '--languages', 'en,de', '--out', out, '--workers', '1', '--quiet')
  assert code == 0
  assert json.loads(stdout) == {'inputs': 1, 'kept': 2,
                                'skipped': {'language_filtered': 1, 'corrupt_image': 1}}
  src = arrayrecord.Source(os.path.join(out, 'wit_v1.train.all-00000-of-00010.array_record'))
  got = [src[i] for i in range(len(src))]
  assert [(r['caption'], r['language'], r['image']) for r in got] == [
      ('reference caption 0', 'en', fx.jpeg(0)), ('reference caption 1', 'de', fx.jpeg(1))]
  report = convert.check(out)
  assert report['languages'] == {'en': 1, 'de': 1}
