"""WIT TSVs as released, the caption policy, and the join with image bytes."""
import gzip
import os

import data_fixtures as fx
import pytest

from vlp.data import records, wit


def _keys_reasons(recs):
  return [(r['key'], r.get(records.SKIP)) for r in recs]


def test_rows_become_records_with_parsed_fields(tmp_path):
  path = fx.write_wit_tsv(str(tmp_path / 'wit_v1.train.all-00000-of-00010.tsv.gz'),
                          [fx.wit_row(0), fx.wit_row(1, is_main_image='false', original_height='')])
  recs = list(wit.read_tsv(path))
  assert [r['key'] for r in recs] == ['wit_v1.train.all-00000-of-00010:0', 'wit_v1.train.all-00000-of-00010:1']
  assert recs[0]['caption'] == 'reference caption 0' and recs[0]['language'] == 'en'
  assert recs[0]['url'] == 'https://upload.wikimedia.org/wikipedia/commons/a/ab/File_0.jpg'
  assert recs[0]['meta']['original_height'] == 480 and recs[0]['meta']['is_main_image'] is True
  # 'false' is False: bool('false') would be True
  assert recs[1]['meta']['is_main_image'] is False and recs[1]['meta']['original_height'] is None


def test_quoted_fields_keep_newlines_and_tabs(tmp_path):
  text = 'line one\nline two\twith a tab and "quotes"'
  rows = [fx.wit_row(0, context_page_description=text), fx.wit_row(1, caption_reference_description=text),
          fx.wit_row(2)]
  path = fx.write_wit_tsv(str(tmp_path / 'a.tsv'), rows, compress=False)
  with open(path) as f:
    assert len(f.read().splitlines()) == 1 + 3 + 2  # line splitting would see 6 rows
  recs = list(wit.read_tsv(path))
  assert [r['key'] for r in recs] == ['a:0', 'a:1', 'a:2']
  assert recs[1]['caption'] == 'line one line two with a tab and "quotes"'  # whitespace normalised
  assert recs[2]['caption'] == 'reference caption 2'


def test_caption_policy_order_and_language_label():
  policy = wit.CaptionPolicy()
  row = fx.wit_row(0, caption_reference_description=' ')
  assert policy.caption(row) == 'attribution 0'
  assert policy.caption({**row, 'caption_attribution_description': 'Simple English: a  castle'}) == 'a castle'
  assert policy.caption({**row, 'caption_attribution_description': 'Norsk bokmål: Fjord'}) == 'Fjord'
  assert policy.caption({**row, 'caption_attribution_description': 'Photo taken in 1900: castle'}) == \
      'Photo taken in 1900: castle'
  assert policy.caption({**row, 'caption_attribution_description': '',
                         'caption_alt_text_description': 'alt text'}) == 'alt text'
  # the label is only stripped from the attribution
  assert wit.CaptionPolicy(order=('reference',)).caption({**row, 'caption_reference_description':
                                                          'English: kept'}) == 'English: kept'
  assert wit.CaptionPolicy(order=('alt_text', 'reference')).caption(
      fx.wit_row(0, caption_alt_text_description='alt')) == 'alt'
  with pytest.raises(ValueError, match="unknown WIT caption field 'title'"):
    wit.CaptionPolicy(order=('title',))


def test_policy_filters_are_counted(tmp_path):
  rows = [fx.wit_row(0), fx.wit_row(1, language='de'), fx.wit_row(2, is_main_image='FALSE'),
          fx.wit_row(3, caption_reference_description='', caption_attribution_description='',
                     caption_alt_text_description=''),
          fx.wit_row(4, is_main_image='yes')]
  path = fx.write_wit_tsv(str(tmp_path / 'w.tsv.gz'), rows)
  recs = list(wit.read_tsv(path, wit.CaptionPolicy(languages=('en', 'fr'), main_image_only=True)))
  assert [r.get(records.SKIP) for r in recs] == [None, 'language_filtered', 'not_main_image', 'empty_caption',
                                                 'bad_row']


def test_header_is_checked(tmp_path):
  path = tmp_path / 'x.tsv'
  path.write_text('url\tcaption\nhttp://a\ta cat\n')
  with pytest.raises(ValueError, match='not a WIT TSV.*language.*image_url'):
    list(wit.read_tsv(str(path)))


def test_gzip_is_found_by_its_magic_bytes(tmp_path):
  rows = [fx.wit_row(i) for i in range(3)]
  gz = fx.write_wit_tsv(str(tmp_path / 'named_plain.tsv'), rows, compress=True)
  plain = fx.write_wit_tsv(str(tmp_path / 'p.tsv'), rows, compress=False)
  assert [r['caption'] for r in wit.read_tsv(gz)] == [r['caption'] for r in wit.read_tsv(plain)]


def test_truncated_gzip_keeps_rows_before_the_cut(tmp_path):
  rows = [fx.wit_row(i, context_page_description=os.urandom(300).hex()) for i in range(50)]
  path = fx.write_wit_tsv(str(tmp_path / 't.tsv.gz'), rows)
  fx.truncate(path, 0.5)
  recs = list(wit.read_tsv(path))
  assert recs[-1][records.SKIP] == 'truncated_file'
  good = [r for r in recs if not records.is_skipped(r)]
  assert 5 < len(good) < 50
  assert [r['caption'] for r in good] == [f'reference caption {i}' for i in range(len(good))]


def test_non_utf8_caption_spoils_its_row_only(tmp_path):
  path = str(tmp_path / 'b.tsv.gz')
  fx.write_wit_tsv(path, [fx.wit_row(0, caption_reference_description='CAFE'), fx.wit_row(1)])
  with gzip.open(path, 'rb') as f:
    data = f.read().replace(b'CAFE', b'caf\xe9')  # Latin-1, not UTF-8
  with gzip.open(path, 'wb') as f:
    f.write(data)
  assert _keys_reasons(wit.read_tsv(path)) == [('b:0', 'bad_utf8'), ('b:1', None)]


def test_join_with_shards_and_pixel_files(tmp_path):
  rows = [fx.wit_row(i) for i in range(4)]
  recs = list(wit.read_tsv(fx.write_wit_tsv(str(tmp_path / 'w.tsv.gz'), rows)))
  urls = [r['url'] for r in recs]
  # images 0 and 1 from a pixel file (1 with broken base64), 2 from an img2dataset shard, 3 nowhere
  pixels = fx.write_pixel_file(str(tmp_path / 'pixels.tsv.gz'), [(urls[0], fx.jpeg(0)), (urls[1], '@@not base64')])
  assert [d is None for _, d in wit.read_pixel_file(pixels)] == [False, True]
  shard = fx.write_shard(str(tmp_path / 'img'), 0, [fx.sample(2)])
  images = {**wit.images_from_pixel_files([pixels]), **wit.images_from_shards([shard])}
  assert set(images) == {urls[0], 'https://example.com/000000000.jpg'}
  images[urls[2]] = images.pop('https://example.com/000000000.jpg')
  out = list(wit.join(recs + [records.skipped('w:9', 'bad_row')], images))
  assert [r.get(records.SKIP) for r in out] == [None, 'missing_image', None, 'missing_image', 'bad_row']
  assert out[0]['image'] == fx.jpeg(0) and out[2]['image'] == fx.jpeg(2)
