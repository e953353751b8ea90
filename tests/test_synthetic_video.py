"""The synthetic videos: determinism, and captions and labels that say how the
objects move.

The checks read objects back from the pixels (by exact palette colour, there is
no anti-aliasing) and parse the captions with their own pattern, independently
of how the generator builds either.
"""
import collections
import re

import numpy as np
import pytest

from vlp.data import synthetic, synthetic_video as sv

SHAPES = ['circle', 'square', 'triangle', 'star', 'cross', 'diamond']
# Phrase -> unit motion in image coordinates (y grows downwards).
MOTIONS = {'to the left': (-1, 0), 'to the right': (1, 0), 'up': (0, -1),
           'down': (0, 1)}
OBJECT = (r'a (small|large) (\w+) (\w+) moving '
          r'(to the left|to the right|up|down)')
CAPTION = re.compile(rf'(?:|a video of |a clip showing |we see )'
                     rf'{OBJECT}(?: and {OBJECT})?')


def parse(caption):
  """[(size, colour, shape, phrase)] per object, in the caption's order."""
  m = CAPTION.fullmatch(caption)
  assert m, caption
  groups = m.groups()
  return [groups[:4]] + ([groups[4:]] if groups[4] else [])


def mask(frame, colour):
  return np.all(frame == np.asarray(synthetic.COLOUR_RGB[colour], np.uint8), -1)


def centroid(frame, colour):
  ys, xs = np.nonzero(mask(frame, colour))
  assert xs.size, colour
  return np.array([xs.mean(), ys.mean()])


def hidden_by(frame, a, b):
  """Whether colour a is gone or its bounding box touches that of b."""
  (ax, ay), (bx, by) = (np.nonzero(mask(frame, c))[::-1] for c in (a, b))
  if not ax.size:
    return True
  return (ax.min() <= bx.max() + 1 and bx.min() <= ax.max() + 1 and
          ay.min() <= by.max() + 1 and by.min() <= ay.max() + 1)


def motion_of(video, colour):
  """(phrase, displacement along it, across it) of a colour from the first to
  the last frame, in pixels."""
  d = centroid(video[-1], colour) - centroid(video[0], colour)
  phrase = max(MOTIONS, key=lambda p: np.dot(MOTIONS[p], d))
  along = np.dot(MOTIONS[phrase], d)
  return phrase, along, np.linalg.norm(d - along * np.asarray(MOTIONS[phrase]))


def check_example(example, size, frames):
  """Everything that must hold for one example, read from its pixels."""
  video, caption = example['video'], example['caption']
  assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
  assert example['language'] == 'en'
  objects = parse(caption)
  colours = [c for _, c, _, _ in objects]
  assert len(set(colours)) == len(colours), caption
  # Nothing touches the border in any frame.
  background = np.asarray(synthetic.BACKGROUND_RGB, np.uint8)
  for edge in (video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]):
    assert np.all(edge == background), caption
  # Every pixel is background or a mentioned object; all visible in frame 0.
  covered = np.all(video == background, -1)
  for size_word, colour, _, _ in objects:
    covered |= np.stack([mask(f, colour) for f in video])
    ys, xs = np.nonzero(mask(video[0], colour))
    assert xs.size, caption
    # Boxes of 0.144-0.176 (small) or 0.27-0.33 (large) of the side; floored
    # coordinates can add up to one pixel at each end.
    extent = max(np.ptp(xs), np.ptp(ys)) + 1
    assert (extent > 0.22 * size + 1) == (size_word == 'large'), (
        caption, extent)
  assert covered.all(), caption
  # The first object (drawn on top) moves as the caption and the label say;
  # so does the second where the first does not cover it in the last frame.
  for k, (_, colour, _, phrase) in enumerate(objects):
    if k and hidden_by(video[-1], colour, objects[0][1]):
      continue
    moved, along, across = motion_of(video, colour)
    assert moved == phrase, (caption, moved)
    assert along >= 0.25 * size and across <= 1.5, (caption, along, across)
  _, colour, _, phrase = objects[0]
  label = example['label']
  assert 0 <= label < 32
  assert sv.VIDEO_CLASS_NAMES[label] == f'{colour} shape moving {phrase}'
  assert caption.find(f'moving {phrase}') > caption.find(colour) >= 0
  return objects


def test_deterministic_by_index():
  a = sv.SyntheticVideos(num_examples=50)
  b = sv.SyntheticVideos(num_examples=50)
  for i in [7, 3, 7, 49]:  # Any access order.
    x, y = a[i], b[i]
    np.testing.assert_array_equal(x['video'], y['video'])
    assert (x['caption'], x['label'], x['index']) == (
        y['caption'], y['label'], i)
    assert a.captions(i) == [('en', x['caption'])]


def test_splits_and_seeds_are_independent_streams():
  train = sv.SyntheticVideos('train', num_examples=20)
  others = [sv.SyntheticVideos('test', num_examples=20),
            sv.SyntheticVideos('train', num_examples=20, seed=1)]
  for other in others:
    assert not any(np.array_equal(train[i]['video'], other[i]['video'])
                   for i in range(20))
  # Nor does a clip start with the image scene of the same index.
  scenes = synthetic.SyntheticScenes(num_examples=20, image_size=32)
  assert not any(np.array_equal(train[i]['video'][0], scenes[i]['image'])
                 for i in range(20))


def test_length_repr_and_errors():
  ds = sv.SyntheticVideos(num_examples=5)
  assert len(ds) == 5 and 'SyntheticVideos(' in repr(ds)
  for index in (5, -1):
    with pytest.raises(IndexError):
      ds[index]
  with pytest.raises(IndexError):
    ds.captions(5)
  with pytest.raises(ValueError):
    sv.SyntheticVideos('dev')
  with pytest.raises(ValueError):
    sv.SyntheticVideos(frames=1)
  with pytest.raises(ValueError):
    sv.SyntheticVideos(image_size=8)


def test_captions_and_labels_describe_the_motion():
  ds = sv.SyntheticVideos('validation', num_examples=1000)
  counts = collections.Counter()
  for i in range(300):
    objects = check_example(ds[i], 32, 8)
    counts[len(objects)] += 1
  assert min(counts[1], counts[2]) > 100, counts


def test_motion_is_steady():
  """Constant speed: the first object advances about equally every frame."""
  ds = sv.SyntheticVideos(num_examples=100, image_size=64, frames=6)
  for i in range(30):
    example = ds[i]
    _, colour, _, phrase = parse(example['caption'])[0]
    path = np.array([np.dot(MOTIONS[phrase], centroid(f, colour))
                     for f in example['video']])
    steps = np.diff(path)
    assert steps.min() > 0 and steps.max() - steps.min() < 1.5, steps


def test_classes_and_directions_are_balanced():
  ds = sv.SyntheticVideos(num_examples=1000)
  labels = collections.Counter()
  directions = collections.Counter()
  for i in range(600):
    example = ds[i]
    labels[example['label']] += 1
    directions.update(p for *_, p in parse(example['caption']))
  assert len(sv.VIDEO_CLASS_NAMES) == len(set(sv.VIDEO_CLASS_NAMES)) == 32
  assert sv.VIDEO_CLASS_NAMES[0] == 'red shape moving to the left'
  assert sorted(labels) == list(range(32))
  assert min(labels.values()) >= 600 / 32 / 3, labels
  assert sorted(directions) == sorted(MOTIONS)
  assert min(directions.values()) >= sum(directions.values()) / 4 / 3


@pytest.mark.parametrize('frames,size', [(4, 48), (2, 32), (16, 24)])
def test_other_lengths_and_resolutions(frames, size):
  ds = sv.SyntheticVideos('test', num_examples=100, image_size=size,
                          frames=frames)
  for i in range(40):
    check_example(ds[i], size, frames)
