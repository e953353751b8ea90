"""TfdsSource over a tiny COCO-shaped TFDS dataset built here, without TensorFlow."""
import io
import pickle
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vlp.data import records, tfds_source

NAME = 'vlp_tiny_captions'
CAPTIONS = ['a dog on a red sofa', 'ein Hund auf einem roten Sofa',
            'un chien sur un canapé rouge', 'собака на красном диване',
            '赤いソファの上の犬', 'लाल सोफे पर एक कुत्ता']


def png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  return buffer.getvalue()


def examples(split: str) -> list[dict]:
  """What the builder writes: images of several sizes, 0 to 4 captions each."""
  rng = np.random.default_rng(len(split))
  out = []
  for i in range(5 if split == 'train' else 3):
    pixels = rng.integers(0, 256, (6 + i, 9 - i, 3), dtype=np.uint8)
    texts = [CAPTIONS[(i + j) % len(CAPTIONS)] for j in range(i % 5)]
    out.append({'pixels': pixels, 'image/id': 100 + i, 'texts': texts})
  return out


class VlpTinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The features of coco_captions (image, image/id, captions {id, text}),
  and a title: one text per image."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    # DatasetInfo directly: dataset_info_from_configs reads metadata files
    # next to a builder module, which a test has not.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='png'),
        'image/id': np.int64,
        'captions': tfds.features.Sequence({'id': np.int64, 'text': tfds.features.Text()}),
        'title': tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in ('train', 'validation')}

  def _generate_examples(self, split):
    # Images go in encoded: TFDS encodes numpy arrays with TensorFlow, but
    # stores bytes as they are (so does coco_captions, from JPEG files).
    for i, ex in enumerate(examples(split)):
      yield i, {'image': png(ex['pixels']), 'image/id': ex['image/id'],
                'captions': [{'id': 10 * i + j, 'text': t} for j, t in enumerate(ex['texts'])],
                'title': f'picture {i} ∑'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  tfds.disable_progress_bar()
  VlpTinyCaptions(data_dir=path, file_format='array_record').download_and_prepare()
  return path


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_reads_back_every_example(data_dir, split):
  source = tfds_source.TfdsSource(NAME, split, data_dir=data_dir, language='xx')
  expected = {ex['image/id']: ex for ex in examples(split)}
  assert len(source) == len(expected)
  seen = set()
  for i in range(len(source)):
    record = source[i]
    if records.is_skipped(record):  # the example without captions
      assert record == records.skipped(f'{NAME}/{split}/{i}', 'empty_caption')
      assert source.captions(i) == []
      continue
    # TFDS shuffles examples as it writes them: image/id says which this is.
    ex = expected[record['meta']['image/id']]
    seen.add(ex['image/id'])
    assert record['key'] == f'{NAME}/{split}/{i}'
    assert source.captions(i) == [('xx', t) for t in ex['texts']]
    assert (record['caption'], record['language']) == (ex['texts'][0], 'xx')
    # Encoded bytes, exactly as stored, with the generated pixels.
    assert record['image'] == png(ex['pixels'])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(record['image']))), ex['pixels'])
  assert seen == {i for i, ex in expected.items() if ex['texts']}


def test_a_single_text_caption(data_dir):
  source = tfds_source.TfdsSource(NAME, 'validation', data_dir=data_dir, caption_key='title')
  for i in range(len(source)):
    record = source[i]
    assert record['caption'] == f'picture {record["meta"]["image/id"] - 100} ∑'
    assert source.captions(i) == [('', record['caption'])] and 'title' not in record['meta']


def test_a_slash_in_a_feature_name(data_dir):
  # 'image/id' is COCO's feature of that name, not 'id' inside 'image'; and
  # an integer is no caption.
  with pytest.raises(ValueError, match="caption_key='image/id' is .*not a text feature"):
    tfds_source.TfdsSource(NAME, 'train', data_dir=data_dir, caption_key='image/id')


def test_pickles_for_grain_workers(data_dir):
  source = tfds_source.TfdsSource(NAME, 'train', data_dir=data_dir)
  clone = pickle.loads(pickle.dumps(source))
  assert len(clone) == len(source)
  assert [clone[i] for i in range(len(source))] == [source[i] for i in range(len(source))]
  assert {source[i].get('language') for i in range(len(source))} == {'', None}  # None: skipped


def test_unknown_dataset(data_dir):
  with pytest.raises(ValueError, match="'no_such_dataset' is not prepared under data_dir="):
    tfds_source.TfdsSource('no_such_dataset', 'train', data_dir=data_dir)


def test_unknown_split(data_dir):
  with pytest.raises(ValueError, match="Unknown split 'test'"):
    tfds_source.TfdsSource(NAME, 'test', data_dir=data_dir)


@pytest.mark.parametrize('caption_key, missing, available', [
    ('captions/txt', "'txt' at captions", "['id', 'text']"),
    ('caption/text', "'caption' at the top level", "['captions', 'image', 'image/id', 'title']"),
])
def test_missing_caption_feature_names_the_available_ones(data_dir, caption_key, missing, available):
  with pytest.raises(ValueError) as e:
    tfds_source.TfdsSource(NAME, 'train', data_dir=data_dir, caption_key=caption_key)
  assert f'no feature {missing}' in str(e.value) and available in str(e.value)


def test_image_key_must_be_an_image(data_dir):
  with pytest.raises(ValueError, match="image_key='captions/text' is .* in a Sequence"):
    tfds_source.TfdsSource(NAME, 'train', data_dir=data_dir, image_key='captions/text')
  with pytest.raises(ValueError, match="no feature 'picture'"):
    tfds_source.TfdsSource(NAME, 'train', data_dir=data_dir, image_key='picture')


def test_reading_needs_no_tensorflow(data_dir):
  source = tfds_source.TfdsSource(NAME, 'train', data_dir=data_dir)
  [source[i] for i in range(len(source))]
  assert 'tensorflow' not in sys.modules
