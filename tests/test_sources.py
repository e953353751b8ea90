"""img2dataset shard reading and LAION metadata filtering, on real-format fixtures."""
import gzip
import os
import tarfile

import pytest

import data_fixtures as fx
from vlp.data import laion, records, webdataset


def _ok(recs):
  return [r for r in recs if not records.is_skipped(r)]


def _skips(recs):
  return [(r['key'], r[records.SKIP]) for r in recs if records.is_skipped(r)]


def test_shard_members_become_records(tmp_path):
  images = [fx.jpeg(i) for i in range(3)]
  path = fx.write_shard(str(tmp_path), 7, [fx.sample(i, image=images[i], similarity=0.1 * i)
                                           for i in range(3)])
  with tarfile.open(path) as tar:  # the layout img2dataset writes
    assert tar.getnames()[:3] == ['000070000.jpg', '000070000.txt', '000070000.json']
  recs = list(webdataset.read_shard(path))
  assert [r['key'] for r in recs] == ['000070000', '000070001', '000070002']
  assert [r['image'] for r in recs] == images
  assert [r['caption'] for r in recs] == [f'a photo number {i}' for i in range(3)]
  assert recs[1]['url'] == 'https://example.com/000070001.jpg'
  assert recs[2]['meta']['similarity'] == pytest.approx(0.2)
  assert recs[2]['meta']['original_width'] == 400
  assert 'caption' not in recs[0]['meta'] and 'url' not in recs[0]['meta']


def test_png_and_webp_members_are_images(tmp_path):
  path = str(tmp_path / '00000.tar')
  with tarfile.open(path, 'w') as tar:
    fx._add(tar, 'a.png', b'png-bytes')
    fx._add(tar, 'a.txt', b'first')
    fx._add(tar, 'b.webp', b'webp-bytes')
    fx._add(tar, 'b.txt', b'second')
  recs = list(webdataset.read_shard(path))
  assert [(r['key'], r['image'], r['caption']) for r in recs] == [
      ('a', b'png-bytes', 'first'), ('b', b'webp-bytes', 'second')]


def test_bad_members_are_skipped_with_their_reason(tmp_path):
  samples = [fx.sample(0), fx.sample(1, caption=b'caf\xe9 latin-1'), fx.sample(2, image=b''),
             fx.sample(3), fx.sample(4, caption='')]
  path = fx.write_shard(str(tmp_path), 0, samples, no_caption=(3,))
  recs = list(webdataset.read_shard(path))
  assert _skips(recs) == [('000000001', 'bad_utf8'), ('000000002', 'missing_image'),
                          ('000000003', 'missing_caption')]
  # An empty caption is handed on: the pipeline counts it as empty_caption.
  assert [(r['key'], r['caption']) for r in _ok(recs)] == [('000000000', 'a photo number 0'),
                                                          ('000000004', '')]


@pytest.mark.parametrize('keep', [0.2, 0.5, 0.75])
def test_truncated_shard_keeps_what_came_before_and_says_so(tmp_path, keep):
  path = fx.write_shard(str(tmp_path), 0, [fx.sample(i, image=fx.jpeg(i, (200, 150))) for i in range(6)])
  whole = list(webdataset.read_shard(path))
  with tarfile.open(path) as tar:  # where each key's caption ends
    ends = {m.name.split('.')[0]: m.offset_data + m.size for m in tar.getmembers() if m.name.endswith('.txt')}
  cut = int(os.path.getsize(path) * keep)
  assert cut < max(ends.values())  # the cut is in the data, not in the end padding
  fx.truncate(path, keep)
  recs = list(webdataset.read_shard(path))
  readable = [r for r in whole if ends[r['key']] <= cut]
  assert recs[-1][records.SKIP] == 'truncated_shard'
  # at most one key lost its .txt to the cut; all the others are whole
  assert [why for _, why in _skips(recs[:-1])] in ([], ['missing_caption'])
  assert [(r['key'], r['image'], r['caption']) for r in _ok(recs)] == [
      (r['key'], r['image'], r['caption']) for r in readable]


def test_tar_cut_at_a_member_boundary_is_truncated(tmp_path):
  # tarfile alone takes a cut between members for the end of the archive.
  path = fx.write_shard(str(tmp_path), 0, [fx.sample(i) for i in range(3)])
  with tarfile.open(path) as tar:
    end_of_second = next(m for m in tar.getmembers() if m.name == '000000001.json')
    cut = end_of_second.offset_data + -(-end_of_second.size // 512) * 512
  with open(path, 'rb') as f:
    data = f.read()[:cut]
  with open(path, 'wb') as f:
    f.write(data)
  recs = list(webdataset.read_shard(path))
  assert [r['key'] for r in recs] == ['000000000', '000000001', '00000.tar:000000001']
  assert recs[-1][records.SKIP] == 'truncated_shard'


def test_not_a_tar_is_a_bad_shard(tmp_path):
  path = tmp_path / '00000.tar'
  path.write_bytes(b'<html>403 Forbidden</html>')
  assert _skips(webdataset.read_shard(str(path))) == [('00000.tar:', 'bad_shard')]


def test_gzipped_tar(tmp_path):
  plain = fx.write_shard(str(tmp_path), 0, [fx.sample(i) for i in range(2)])
  gz = str(tmp_path / '00000.tar.gz')
  with open(plain, 'rb') as src, gzip.open(gz, 'wb') as dst:
    dst.write(src.read())
  assert list(webdataset.read_shard(gz)) == list(webdataset.read_shard(plain))


def test_expand_ranges_globs_dirs_and_errors(tmp_path):
  for i in range(3):
    fx.write_shard(str(tmp_path), i, [fx.sample(0)])
  d = str(tmp_path)
  names = lambda ps: [os.path.basename(p) for p in ps]
  assert names(webdataset.expand(f'{d}/{{00000..00002}}.tar')) == ['00000.tar', '00001.tar', '00002.tar']
  assert names(webdataset.expand(f'{d}/{{00001..00002}}.tar')) == ['00001.tar', '00002.tar']
  assert names(webdataset.expand(f'{d}/*.tar')) == ['00000.tar', '00001.tar', '00002.tar']
  assert names(webdataset.expand(d)) == ['00000.tar', '00001.tar', '00002.tar']
  assert names(webdataset.expand([f'{d}/00002.tar', f'{d}/00000.tar'])) == ['00002.tar', '00000.tar']
  with pytest.raises(ValueError, match='matches no file'):
    webdataset.expand(f'{d}/laion-*.tar')
  with pytest.raises(ValueError, match='00003.tar'):
    webdataset.expand(f'{d}/{{00000..00003}}.tar')


def test_read_shards_splits_by_process(tmp_path):
  paths = [fx.write_shard(str(tmp_path), s, [fx.sample(i) for i in range(2)]) for s in range(5)]
  keys = lambda pi, pc: [r['key'] for r in webdataset.read_shards(paths, pi, pc)]
  first, second = keys(0, 2), keys(1, 2)
  assert not set(first) & set(second)
  assert sorted(first + second) == sorted(keys(0, 1))
  assert first[:2] == ['000000000', '000000001'] and second[:2] == ['000010000', '000010001']


def test_download_stats_beside_the_shard(tmp_path):
  path = fx.write_shard(str(tmp_path), 0, [fx.sample(0)], failed=2)
  assert webdataset.download_stats(path)['failed_to_download'] == 2
  os.remove(str(tmp_path / '00000_stats.json'))
  assert webdataset.download_stats(path) is None


def _rec(key='k', language='', **meta):
  return records.make(key, b'x', 'c', language=language, meta=meta)


def test_filter_reasons():
  f = laion.Filter(min_similarity=0.28, min_width=256, min_height=256, max_punsafe=0.5, languages=('en',))
  good = dict(similarity=0.3, original_width=300, original_height=256, punsafe=0.1)
  assert f.reason(_rec(language='en', **good)) is None
  assert f.reason(_rec(language='en', **{**good, 'similarity': 0.279})) == 'low_similarity'
  assert f.reason(_rec(language='en', **{**good, 'original_height': 255})) == 'too_small'
  assert f.reason(_rec(language='en', **{**good, 'punsafe': 0.51})) == 'unsafe'
  assert f.reason(_rec(language='de', **good)) == 'language_filtered'
  no_sim = {k: v for k, v in good.items() if k != 'similarity'}
  assert f.reason(_rec(language='en', **no_sim)) == 'no_similarity'
  # without original_* the resized size is what there is
  assert f.reason(_rec(language='en', similarity=0.3, width=300, height=300, punsafe=0.1)) is None
  assert laion.Filter().reason(_rec()) is None


def test_apply_filter_keeps_order_and_counts(tmp_path):
  recs = [_rec('a', similarity=0.5), records.skipped('b', 'bad_utf8'), _rec('c', similarity=0.1)]
  out = list(laion.apply_filter(recs, laion.Filter(min_similarity=0.3)))
  assert [r['key'] for r in out] == ['a', 'b', 'c']
  assert [r.get(records.SKIP) for r in out] == [None, 'bad_utf8', 'low_similarity']


def test_read_metadata_either_case(tmp_path):
  upper = fx.write_laion_metadata(str(tmp_path / 'part-00000.parquet'), [
      {'SAMPLE_ID': 1, 'URL': 'http://a', 'TEXT': 'a cat', 'WIDTH': 640, 'HEIGHT': 480,
       'LICENSE': '?', 'NSFW': 'UNLIKELY', 'similarity': 0.31},
      {'SAMPLE_ID': 2, 'URL': 'http://b', 'TEXT': 'a dog', 'WIDTH': 100, 'HEIGHT': None,
       'LICENSE': '?', 'NSFW': 'NSFW', 'similarity': 0.29}])
  lower = fx.write_laion_metadata(str(tmp_path / 'x.parquet'), [
      {'url': 'http://c', 'caption': 'a bird', 'similarity': 0.4, 'punsafe': 0.2, 'language': 'en'}])
  rows = laion.read_metadata([upper, lower])
  assert rows['http://a'] == {'caption': 'a cat', 'width': 640, 'height': 480, 'license': '?',
                              'nsfw': 'UNLIKELY', 'similarity': pytest.approx(0.31)}
  assert 'height' not in rows['http://b']
  assert rows['http://c']['punsafe'] == pytest.approx(0.2) and rows['http://c']['language'] == 'en'
  with pytest.raises(ValueError, match='no URL column'):
    laion.read_metadata([fx.write_laion_metadata(str(tmp_path / 'y.parquet'), [{'TEXT': 'x'}])])
