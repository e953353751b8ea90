"""The synthetic scenes: determinism, and captions that say what is drawn.

The checks read objects back from the pixels (by exact palette colour) and
parse the captions with their own word lists, independently of how the
generator builds either.
"""
import re

import numpy as np
import pytest

from vlp.data import synthetic

# Word stems per language, written independently of the generator's grammar:
# a colour/shape counts as mentioned when a word of the caption starts with it.
COLOUR_STEMS = {
    'en': ['red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white',
           'black'],
    'de': ['rot', 'grün', 'blau', 'gelb', 'violett', 'orange', 'weiß',
           'schwarz'],
    'fr': ['rouge', 'vert', 'bleu', 'jaune', 'violet', 'orange', 'blanc',
           'noir'],
    'es': ['roj', 'verde', 'azul', 'amarill', 'morad', 'naranja', 'blanc',
           'negr'],
}
SHAPE_WORDS = {
    'en': ['circle', 'square', 'triangle', 'star', 'cross', 'diamond'],
    'de': ['Kreis', 'Quadrat', 'Dreieck', 'Stern', 'Kreuz', 'Raute'],
    'fr': ['cercle', 'carré', 'triangle', 'étoile', 'croix', 'losange'],
    'es': ['círculo', 'cuadrado', 'triángulo', 'estrella', 'cruz', 'rombo'],
}
EN_OBJECT = r'(small|large) (\w+) (\w+)'
EN_RELATION = re.compile(
    EN_OBJECT + r' (to the left of|to the right of|above|below) (?:a|the) ' +
    EN_OBJECT)


def mentioned(words, caption):
  """Indices of the words that start some word of the caption."""
  tokens = re.findall(r"\w+", caption)
  return {i for i, w in enumerate(words)
          if any(t.startswith(w) for t in tokens)}


def objects_in(image):
  """Colour name -> (centre x, centre y, width, height, mask) from pixels."""
  found = {}
  for name, rgb in synthetic.COLOUR_RGB.items():
    mask = np.all(image == np.asarray(rgb, np.uint8), axis=-1)
    if mask.any():
      ys, xs = np.nonzero(mask)
      found[name] = ((xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2,
                     xs.max() - xs.min() + 1, ys.max() - ys.min() + 1, mask)
  return found


def shape_of(cx, cy, w, h, mask):
  """Recognises a shape from how much of its bounding box it fills and from
  its widths a quarter of the height below the top and above the bottom."""
  fill = mask.sum() / (w * h)
  if fill > 0.9:
    return 'square'
  if fill > 0.7:
    return 'circle'  # pi / 4
  if fill < 0.45:
    return 'star'  # ~0.35; the others fill half of their box.
  upper = mask[int(round(cy - h / 4))].sum() / w  # Triangle 1/4, diamond 1/2,
  lower = mask[int(round(cy + h / 4))].sum() / w  # cross 0.3 (arm width).
  if lower - upper > 0.25:
    return 'triangle'  # Lower width 3/4.
  return 'diamond' if upper > 0.4 else 'cross'


def test_deterministic_by_index():
  a = synthetic.SyntheticScenes(num_examples=50)
  b = synthetic.SyntheticScenes(num_examples=50)
  for i in [7, 3, 7, 49]:  # Any access order.
    x, y = a[i], b[i]
    np.testing.assert_array_equal(x['image'], y['image'])
    assert (x['caption'], x['label'], x['index']) == (
        y['caption'], y['label'], i)
    assert a.captions(i) == b.captions(i)


def test_splits_and_seeds_are_independent_streams():
  train = synthetic.SyntheticScenes('train', num_examples=20)
  test = synthetic.SyntheticScenes('test', num_examples=20)
  other_seed = synthetic.SyntheticScenes('train', num_examples=20, seed=1)
  for other in (test, other_seed):
    same = sum(np.array_equal(train[i]['image'], other[i]['image'])
               for i in range(20))
    assert same == 0


def test_index_out_of_range():
  with pytest.raises(IndexError):
    synthetic.SyntheticScenes(num_examples=5)[5]


@pytest.mark.parametrize('size', [24, 64, 101])
def test_resolution(size):
  image = synthetic.SyntheticScenes(image_size=size)[0]['image']
  assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_languages_of_examples():
  ds = synthetic.SyntheticScenes(num_examples=200, languages=('de', 'fr'))
  langs = [ds[i]['language'] for i in range(40)]
  assert set(langs) == {'de', 'fr'}
  for i in range(10):
    assert (ds[i]['language'], ds[i]['caption']) in ds.captions(i)
    assert [lang for lang, _ in ds.captions(i)] == ['de', 'fr']


def test_captions_describe_the_rendered_scene():
  size = 128  # Enough pixels to recognise small shapes.
  ds = synthetic.SyntheticScenes('validation', num_examples=300,
                                 image_size=size)
  num_relations = {'left': 0, 'right': 0, 'above': 0, 'below': 0}
  for i in range(120):
    example = ds[i]
    objects = objects_in(example['image'])
    shapes = {c: shape_of(*o) for c, o in objects.items()}
    colours = {synthetic.COLOURS.index(c) for c in objects}
    shape_ids = {SHAPE_WORDS['en'].index(s) for s in shapes.values()}
    captions = dict(ds.captions(i))
    assert sorted(captions) == sorted(synthetic.LANGUAGES)
    for lang, caption in captions.items():
      assert mentioned(COLOUR_STEMS[lang], caption) == colours, caption
      assert mentioned(SHAPE_WORDS[lang], caption) == shape_ids, caption

    english = captions['en']
    described = re.findall(EN_OBJECT, english)
    for size_word, colour, shape in described:
      cx, cy, w, h, _ = objects[colour]
      assert shapes[colour] == shape, (english, shapes)
      assert (max(w, h) > 0.22 * size) == (size_word == 'large'), english
    relations = EN_RELATION.findall(english)
    assert len(relations) == len(objects) - 1, english
    for _, subject, _, relation, _, reference, _ in relations:
      sx, sy, *_ = objects[subject]
      rx, ry, *_ = objects[reference]
      dx, dy = sx - rx, sy - ry  # y grows downwards.
      key = {'to the left of': 'left', 'to the right of': 'right'}.get(
          relation, relation)
      num_relations[key] += 1
      holds = {'left': dx < 0 and abs(dx) > abs(dy),
               'right': dx > 0 and abs(dx) > abs(dy),
               'above': dy < 0 and abs(dy) > abs(dx),
               'below': dy > 0 and abs(dy) > abs(dx)}[key]
      assert holds, (english, objects[subject][:2], objects[reference][:2])

    # The label is the (colour, shape) of the first object mentioned.
    _, colour, shape = described[0]
    assert synthetic.CLASS_NAMES[example['label']] == f'{colour} {shape}'
  assert min(num_relations.values()) > 10, num_relations


def test_class_names():
  names = synthetic.CLASS_NAMES
  assert len(names) == len(set(names)) == 48
  ds = synthetic.SyntheticScenes(num_examples=300)
  labels = {ds[i]['label'] for i in range(300)}
  assert labels <= set(range(len(names))) and len(labels) > 40
