"""Procedurally rendered clips of moving objects: the built-in video dataset.

Every clip is 1-2 objects of the synthetic scenes (shape, colour, size on a
plain grey background) that each move in a straight line at constant speed to
the left, right, up or down, with an English caption that says how each one
moves ("a small red circle moving to the left and a large blue square moving
up"). The class label is the colour and motion of the first object mentioned
("red shape moving to the left"), so no single frame tells the class: a model
has to compare frames to classify a clip or to rank captions that differ only
in a direction. Colour rather than shape: a small model learns colours within
a few dozen steps, and from that foothold the rest of the loss is the motion;
with shape x motion a tiny IMP stayed at chance for hundreds of steps.

Everything is a pure function of (seed, split, index, image_size, frames), so
the dataset is a Grain random-access source of any length that any process can
read without coordination.
"""
import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from vlp.data.synthetic import (BACKGROUND_RGB, COLOURS, SHAPES, SIZES,
                                SPLITS, _BORDER, _HALF_EXTENT, _Object, _draw,
                                _overlap)

DIRECTIONS = ('left', 'right', 'up', 'down')
_PHRASES = ('to the left', 'to the right', 'up', 'down')  # Per direction.
_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # Image coordinates: y goes down.
# Classes: (colour, direction) of the first object a caption mentions.
VIDEO_CLASS_NAMES = [f'{c} shape moving {p}' for c in COLOURS for p in _PHRASES]
_TEMPLATES = ('{}', 'a video of {}', 'a clip showing {}', 'we see {}')
# Displacement from the first to the last frame, relative to the image side:
# large enough to be obvious after resizing, small enough to leave room.
_DISTANCE = (0.3, 0.5)
_SALT = 7  # Keeps clips independent of the image scenes of the same index.
_MIN_IMAGE_SIZE = 16  # Below it the pixel margin leaves no room to move.


@dataclasses.dataclass(frozen=True)
class _Track:
  start: _Object  # The object as drawn in the first frame.
  direction: int  # Index into DIRECTIONS.
  distance: float  # Displacement over the clip, relative to the image side.

  def at(self, t: float) -> _Object:
    """The object at time t in [0, 1] along its path."""
    dx, dy = _STEPS[self.direction]
    step = self.distance * t
    return dataclasses.replace(self.start, x=self.start.x + dx * step,
                               y=self.start.y + dy * step)


def _start_box(half, direction, distance, image_size):
  """Corners (lo, hi) of the start centres from which the bounding box stays
  inside the frame along the whole path.

  The margin is _BORDER plus one pixel: PIL floors coordinates, so an edge at
  0.6 px would still paint the border pixel."""
  margin = _BORDER + 1 / image_size
  step = np.multiply(_STEPS[direction], distance)
  return (half + margin - np.minimum(step, 0),
          1 - half - margin - np.maximum(step, 0))


def _sample_clip(rng: np.random.Generator, image_size: int,
                 tries: int = 20) -> tuple[_Track, ...]:
  while True:  # Two objects can leave no room for each other: start over.
    n = 1 if rng.random() < 0.5 else 2
    colours = rng.permutation(len(COLOURS))[:n]  # Distinct: findable by colour.
    shapes = rng.integers(len(SHAPES), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    halves = np.take(_HALF_EXTENT, sizes) * rng.uniform(0.9, 1.1, size=n)
    directions = rng.integers(len(DIRECTIONS), size=n)
    distances = rng.uniform(*_DISTANCE, size=n)
    tracks = []
    for i in range(n):
      lo, hi = _start_box(halves[i], directions[i], distances[i], image_size)
      # Clear of the others in the first frame; they may cross later.
      for x, y in rng.uniform(lo, hi, size=(tries, 2)):
        obj = _Object(int(shapes[i]), int(colours[i]), int(sizes[i]),
                      float(x), float(y), float(halves[i]))
        if not any(_overlap(obj, t.start) for t in tracks):
          tracks.append(_Track(obj, int(directions[i]), float(distances[i])))
          break
      else:
        break
    else:
      return tuple(tracks)


def _render(tracks: tuple[_Track, ...], image_size: int,
            frames: int) -> np.ndarray:
  video = np.empty((frames, image_size, image_size, 3), np.uint8)
  for f in range(frames):
    image = Image.new('RGB', (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    # The first object is drawn last, so the labelled object is never hidden.
    for track in reversed(tracks):
      _draw(draw, track.at(f / (frames - 1)), image_size)
    video[f] = np.asarray(image)
  return video


def _describe(tracks: tuple[_Track, ...], template: int) -> str:
  return _TEMPLATES[template].format(' and '.join(
      f'a {SIZES[t.start.size]} {COLOURS[t.start.colour]} '
      f'{SHAPES[t.start.shape]} moving {_PHRASES[t.direction]}'
      for t in tracks))


class SyntheticVideos:
  """Grain random-access source of rendered clips with English captions.

  Example i of a split is a pure function of (seed, split, i, image_size,
  frames): the clip and its caption template come from one generator seeded
  with [seed, split_id, i, _SALT].
  """

  def __init__(self, split: str = 'train', num_examples: int = 100_000,
               image_size: int = 32, frames: int = 8, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f'split {split!r} not in {sorted(SPLITS)}')
    if frames < 2:
      raise ValueError(f'frames must be >= 2 to show motion, got {frames}')
    if image_size < _MIN_IMAGE_SIZE:
      raise ValueError(f'image_size must be at least {_MIN_IMAGE_SIZE}, '
                       f'got {image_size}')
    self.split = split
    self.num_examples = num_examples
    self.image_size = image_size
    self.frames = frames
    self.seed = seed

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticVideos(split={self.split!r}, '
            f'num_examples={self.num_examples}, image_size={self.image_size}, '
            f'frames={self.frames}, seed={self.seed})')

  def _sample(self, index: int) -> tuple[tuple[_Track, ...], str]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range [0, {self.num_examples})')
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index, _SALT])
    tracks = _sample_clip(rng, self.image_size)
    return tracks, _describe(tracks, int(rng.integers(len(_TEMPLATES))))

  def __getitem__(self, index: int) -> dict:
    tracks, caption = self._sample(index)
    first = tracks[0]
    return {
        'video': _render(tracks, self.image_size, self.frames),
        'caption': caption,
        'language': 'en',
        'label': first.start.colour * len(DIRECTIONS) + first.direction,
        'index': int(index),
    }

  def captions(self, index: int) -> list[tuple[str, str]]:
    """[('en', caption)]: the caption of __getitem__, for retrieval evals."""
    return [('en', self._sample(index)[1])]
