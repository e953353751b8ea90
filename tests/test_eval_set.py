"""Retrieval eval sets: images with all their captions, each host decoding only its own images."""
import threading

import data_fixtures as fx
import numpy as np
import pytest

from vlp.core import distributed
from vlp.data import eval_set, records, synthetic, tokenizer as tokenizer_lib
from vlp.eval import embed


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.builtin_tokenizer()


def test_eval_arrays_hold_every_caption_and_uint8_images(tok):
  source = synthetic.SyntheticScenes('test', num_examples=10, image_size=16)
  arrays = eval_set.eval_arrays(source, tok, num_images=5, context_length=32)
  assert arrays['image'].shape == (5, 16, 16, 3) and arrays['image'].dtype == np.uint8
  assert arrays['text'].shape == (20, 32) and arrays['text'].dtype == np.int32
  np.testing.assert_array_equal(arrays['text_to_image'], np.repeat(np.arange(5), 4))
  np.testing.assert_array_equal(arrays['image_rows']['ids'], np.arange(5))
  for j, (text, i) in enumerate(zip(arrays['text'], arrays['text_to_image'])):
    language, caption = source.captions(i)[j % 4]
    assert tok.decode(text) == caption
    np.testing.assert_array_equal(arrays['image'][i], source[i]['image'])


class _Pairs:
  """Image-caption pairs, an image in several records (found by its bytes), a corrupt image,
  a skipped record and an empty caption; counts its reads."""

  def __init__(self):
    images = [fx.jpeg(i) for i in range(6)]
    self.records = [records.make('0', images[0], 'zero a'), records.make('1', images[1], 'one'),
                    records.make('0b', images[0], 'zero b'), records.make('bad', b'junk', 'corrupt'),
                    records.skipped('gone', 'missing_image'), records.make('2', images[2], ' '),
                    records.make('3', images[3], 'three'), records.make('4', images[4], 'four'),
                    records.make('1b', images[1], 'one b'), records.make('5', images[5], 'five')]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


class _Scenes(synthetic.SyntheticScenes):
  """The built-in scenes (one image per record, captions(i)) with record 2 missing; counts the
  records each host reads."""

  def __init__(self):
    super().__init__('test', num_examples=12, image_size=16)
    self.read = []

  def __getitem__(self, i):
    self.read.append(i)
    return records.skipped(str(i), 'missing_image') if i == 2 else super().__getitem__(i)


def _on_hosts(make_source, tok, hosts, num_images):
  """eval_arrays on `hosts` threads standing for hosts, their `agree` a real exchange."""
  barrier, shared, out, sources = threading.Barrier(hosts), [None] * hosts, [None] * hosts, []

  def gather(host):
    def g(x):
      shared[host] = x
      barrier.wait()
      rows = np.stack(list(shared))
      barrier.wait()
      return rows
    return g

  def run(host):
    out[host] = eval_set.eval_arrays(sources[host], tok, num_images=num_images, context_length=16,
                                     image_size=16, hosts=hosts, host=host, agree=distributed.json_agree(gather(host)))

  sources.extend(make_source() for _ in range(hosts))
  threads = [threading.Thread(target=run, args=(h,)) for h in range(hosts)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return out, sources


@pytest.mark.parametrize('make_source', [_Pairs, _Scenes], ids=['pairs', 'one_image_per_record'])
def test_each_host_decodes_its_own_images_and_all_agree_on_the_set(tok, make_source):
  [whole], _ = _on_hosts(make_source, tok, 1, num_images=8)
  parts, sources = _on_hosts(make_source, tok, 3, num_images=8)
  total = whole['image_rows']['total']
  assert total == len(whole['image'])
  if make_source is _Pairs:  # 'bad' and the empty caption leave the set and are counted; '0b' is image 0's
    assert whole['skipped'] == {'corrupt_image': 1, 'missing_image': 1, 'empty_caption': 1}
    assert total == 5 and whole['text_to_image'].tolist() == [0, 1, 0, 2, 3, 1, 4]
  else:  # record 2 is gone: 8 records, 7 images, not replaced by a ninth
    assert whole['skipped'] == {'missing_image': 1} and total == 7
    assert sorted(set().union(*(s.read for s in sources))) == list(range(8))
    for h, s in enumerate(sources):  # a host reads its own records only
      assert all(i % 3 == h for i in s.read)
  for p in parts:  # every host: the same captions, counts and set size
    for k in ('text', 'text_to_image', 'language'):
      np.testing.assert_array_equal(p[k], whole[k])
    assert p['skipped'] == whole['skipped'] and p['image_rows']['total'] == total
  ids = np.concatenate([p['image_rows']['ids'] for p in parts])
  assert sorted(ids.tolist()) == list(range(total))  # each image on one host
  assert max(len(p['image']) for p in parts) == parts[0]['image_rows']['most']
  images = np.zeros_like(whole['image'])
  for p in parts:
    images[p['image_rows']['ids']] = p['image']
  np.testing.assert_array_equal(images, whole['image'])


def test_host_rows_split_a_set_in_turn():
  rows = [embed.host_rows(7, 3, h) for h in range(3)]
  assert [r['ids'].tolist() for r in rows] == [[0, 3, 6], [1, 4], [2, 5]]
  assert {r['most'] for r in rows} == {3} and {r['total'] for r in rows} == {7}


@pytest.mark.parametrize('make_source', [_Pairs, _Scenes], ids=['pairs', 'one_image_per_record'])
def test_streamed_images_decode_the_held_ones_again(tok, make_source):
  """hold_images=False keeps no pixels: rows are read and decoded when asked for, the same ones."""
  [held], _ = _on_hosts(make_source, tok, 1, num_images=8)
  source = make_source()
  streamed = eval_set.eval_arrays(source, tok, num_images=8, context_length=16, image_size=16, hold_images=False)
  images = streamed['image']
  assert isinstance(images, eval_set.StreamedImages) and images.shape == held['image'].shape
  np.testing.assert_array_equal(images[2:5], held['image'][2:5])
  np.testing.assert_array_equal(images[np.array([4, 0])], held['image'][[4, 0]])
  np.testing.assert_array_equal(images[len(images) - 1], held['image'][-1])
  for k in ('text', 'text_to_image'):
    np.testing.assert_array_equal(streamed[k], held[k])
