"""Procedurally rendered scenes: the built-in dataset that needs no download.

Every example is 1-3 non-overlapping objects (shape, colour, size, position) on
a plain grey background, with captions in English, German, French and Spanish
that name every object's size, colour and shape and, for 2-3 objects, the
spatial relation between them ("a small red circle to the left of a large blue
square"). Captions that differ in a single attribute or in the direction of a
relation describe different images, so a model has to look at the image to
rank them: retrieval and zero-shot accuracy separate better models from worse.

Everything is a pure function of (seed, split, index), so the dataset is a
Grain random-access source of any length that any process can read without
coordination.
"""
import abc
import dataclasses

import numpy as np
from PIL import Image, ImageDraw

LANGUAGES = ('en', 'de', 'fr', 'es')
SPLITS = {'train': 0, 'validation': 1, 'test': 2}

COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white',
           'black')
# Saturated, far-apart RGB values; none equals the background, so an object's
# pixels can be found by exact colour (there is no anti-aliasing).
COLOUR_RGB = {
    'red': (220, 30, 30), 'green': (30, 160, 40), 'blue': (40, 70, 230),
    'yellow': (240, 220, 30), 'purple': (140, 40, 180),
    'orange': (250, 140, 10), 'white': (255, 255, 255), 'black': (0, 0, 0),
}
BACKGROUND_RGB = (128, 128, 128)
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'diamond')
SIZES = ('small', 'large')
# Zero-shot classes: (colour, shape) of the first object a caption mentions.
CLASS_NAMES = [f'{c} {s}' for c in COLOURS for s in SHAPES]

# Half the side of an object's bounding box, as a fraction of the image side.
_HALF_EXTENT = (0.08, 0.15)
_BORDER = 0.02  # Free margin between objects and the image border.
_GAP = 0.04  # Free margin between the bounding boxes of two objects.
# A relation is stated only when the offset along its axis is this many times
# the offset along the other axis, so "left of" is never a near-diagonal.
_RELATION_CLARITY = 1.5
_NUM_OBJECTS_CDF = (0.2, 0.65)  # P(1) = 0.2, P(2) = 0.45, P(3) = 0.35.


@dataclasses.dataclass(frozen=True)
class _Object:
  shape: int
  colour: int
  size: int
  x: float  # Centre of the bounding box, relative to the image side.
  y: float  # Grows downwards as in image coordinates.
  half: float  # Half the side of the bounding box.


@dataclasses.dataclass(frozen=True)
class _Scene:
  objects: tuple[_Object, ...]  # In the order the captions mention them.
  # (subject, relation, reference) indices into objects; relation in
  # 'left', 'right', 'above', 'below' says where the subject is.
  relations: tuple[tuple[int, str, int], ...]


def _relation(a: _Object, b: _Object) -> str | None:
  """Where a lies relative to b, or None when the direction is ambiguous."""
  dx, dy = a.x - b.x, a.y - b.y
  if abs(dx) >= _RELATION_CLARITY * abs(dy):
    return 'left' if dx < 0 else 'right'
  if abs(dy) >= _RELATION_CLARITY * abs(dx):
    return 'above' if dy < 0 else 'below'
  return None


def _overlap(a: _Object, b: _Object) -> bool:
  reach = a.half + b.half + _GAP
  return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


def _sample_scene(rng: np.random.Generator) -> _Scene:
  n = int(np.searchsorted(_NUM_OBJECTS_CDF, rng.random(), side='right')) + 1
  # Distinct colours keep every caption unambiguous (and every object
  # findable by colour); shapes and sizes may repeat.
  colours = rng.permutation(len(COLOURS))[:n]
  shapes = rng.integers(len(SHAPES), size=n)
  sizes = rng.integers(len(SIZES), size=n)
  halves = np.take(_HALF_EXTENT, sizes) * rng.uniform(0.9, 1.1, size=n)
  # The second object is the reference of every relation: the first and the
  # third are placed relative to it.
  pairs = [(0, 1), (2, 1)][:n - 1]
  order = [1, 0, 2][:n] if n > 1 else [0]
  while True:  # A crowded first placement can leave no room: start over.
    placed = {}
    for i in order:
      obj = _place(rng, shapes[i], colours[i], sizes[i], halves[i],
                   list(placed.values()),
                   placed.get(1) if i != 1 else None)
      if obj is None:
        break
      placed[i] = obj
    else:
      objects = tuple(placed[i] for i in range(n))
      return _Scene(objects, tuple(
          (i, _relation(objects[i], objects[j]), j) for i, j in pairs))


def _place(rng, shape, colour, size, half, others, reference,
           tries=20) -> _Object | None:
  """Rejection-samples a position clear of others and clearly related to the
  reference (if any); None when the canvas has no room left for it."""
  for x, y in rng.uniform(half + _BORDER, 1 - half - _BORDER, size=(tries, 2)):
    obj = _Object(int(shape), int(colour), int(size), float(x), float(y), half)
    if any(_overlap(obj, other) for other in others):
      continue
    if reference is None or _relation(obj, reference) is not None:
      return obj
  return None


def _unit_star() -> np.ndarray:
  """Vertices [10, 2] of a 5-pointed star centred in the box [-1, 1]^2.

  It touches the box sides; its height is 0.95 of the width."""
  outer = 1 / np.sin(np.radians(72))  # Widest points touch the box sides.
  inner = outer * 0.382  # Regular star: ratio of the pentagram's radii.
  angles = np.radians(np.arange(10) * 36 - 90)
  radii = np.where(np.arange(10) % 2 == 0, outer, inner)
  vertices = np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)
  # Shift down so the box (top point to lower points) is centred.
  vertices[:, 1] += outer * (1 - np.cos(np.radians(36))) / 2
  return vertices


_STAR = _unit_star()


def _draw(draw: ImageDraw.ImageDraw, obj: _Object, size: int):
  cx, cy, h = obj.x * size, obj.y * size, obj.half * size
  fill = COLOUR_RGB[COLOURS[obj.colour]]
  shape = SHAPES[obj.shape]
  if shape == 'circle':
    draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
  elif shape == 'square':
    draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
  elif shape == 'triangle':
    draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
  elif shape == 'star':
    draw.polygon([(cx + h * u, cy + h * v) for u, v in _STAR.tolist()],
                 fill=fill)
  elif shape == 'cross':
    arm = 0.3 * h
    draw.rectangle([cx - h, cy - arm, cx + h, cy + arm], fill=fill)
    draw.rectangle([cx - arm, cy - h, cx + arm, cy + h], fill=fill)
  elif shape == 'diamond':
    draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)],
                 fill=fill)


def _render(scene: _Scene, image_size: int) -> np.ndarray:
  image = Image.new('RGB', (image_size, image_size), BACKGROUND_RGB)
  draw = ImageDraw.Draw(image)
  for obj in scene.objects:
    _draw(draw, obj, image_size)
  return np.asarray(image)


class _Grammar(abc.ABC):
  """Noun phrases and relations of one language.

  templates: (format with one {}, grammatical case of the subjects).
  """
  templates: tuple[tuple[str, str], ...]
  conjunction: str

  @abc.abstractmethod
  def subject(self, obj: _Object, case: str) -> str:
    """Indefinite noun phrase of a subject in the given case."""

  @abc.abstractmethod
  def relation(self, rel: str, ref: _Object, definite: bool) -> str:
    """'to the left of a/the <ref>' and its translations."""

  def describe(self, scene: _Scene, template: int) -> str:
    fmt, case = self.templates[template]
    if not scene.relations:
      return fmt.format(self.subject(scene.objects[0], case))
    clauses, mentioned = [], set()
    for subj, rel, ref in scene.relations:
      clauses.append(self.subject(scene.objects[subj], case) + ' ' +
                     self.relation(rel, scene.objects[ref], ref in mentioned))
      mentioned.update((subj, ref))
    return fmt.format(self.conjunction.join(clauses))


class _English(_Grammar):
  templates = (('{}', ''), ('a picture of {}', ''), ('there is {}', ''),
               ('an image showing {}', ''))
  conjunction = ', and '
  _RELATIONS = {'left': 'to the left of', 'right': 'to the right of',
                'above': 'above', 'below': 'below'}

  def _phrase(self, obj, article):
    return (f'{article} {SIZES[obj.size]} {COLOURS[obj.colour]} '
            f'{SHAPES[obj.shape]}')

  def subject(self, obj, case):
    return self._phrase(obj, 'a')

  def relation(self, rel, ref, definite):
    return f"{self._RELATIONS[rel]} {self._phrase(ref, 'the' if definite else 'a')}"


class _German(_Grammar):
  templates = (('{}', 'nom'), ('ein Bild mit {}', 'dat'),
               ('es gibt {}', 'acc'), ('man sieht {}', 'acc'))
  conjunction = ' und '
  _NOUNS = (('Kreis', 'm'), ('Quadrat', 'n'), ('Dreieck', 'n'),
            ('Stern', 'm'), ('Kreuz', 'n'), ('Raute', 'f'))
  _SIZES = ('klein', 'groß')
  _COLOURS = ('rot', 'grün', 'blau', 'gelb', 'violett', 'orangefarben', 'weiß',
              'schwarz')
  # (case, gender) -> (article, adjective ending); mixed declension after the
  # indefinite article, weak after the definite one.
  _INDEFINITE = {
      ('nom', 'm'): ('ein', 'er'), ('nom', 'n'): ('ein', 'es'),
      ('nom', 'f'): ('eine', 'e'), ('acc', 'm'): ('einen', 'en'),
      ('acc', 'n'): ('ein', 'es'), ('acc', 'f'): ('eine', 'e'),
      ('dat', 'm'): ('einem', 'en'), ('dat', 'n'): ('einem', 'en'),
      ('dat', 'f'): ('einer', 'en'),
  }
  _DEFINITE_DATIVE = {'m': 'dem', 'n': 'dem', 'f': 'der'}
  # All four take the dative when they say where something is.
  _RELATIONS = {'left': 'links von', 'right': 'rechts von', 'above': 'über',
                'below': 'unter'}

  def _phrase(self, obj, article, ending):
    noun, _ = self._NOUNS[obj.shape]
    return (f'{article} {self._SIZES[obj.size]}{ending} '
            f'{self._COLOURS[obj.colour]}{ending} {noun}')

  def subject(self, obj, case):
    return self._phrase(obj, *self._INDEFINITE[case, self._NOUNS[obj.shape][1]])

  def relation(self, rel, ref, definite):
    gender = self._NOUNS[ref.shape][1]
    if definite:
      phrase = self._phrase(ref, self._DEFINITE_DATIVE[gender], 'en')
    else:
      phrase = self._phrase(ref, *self._INDEFINITE['dat', gender])
    text = f'{self._RELATIONS[rel]} {phrase}'
    return text.replace('von dem ', 'vom ')


class _French(_Grammar):
  templates = (('{}', ''), ('une image avec {}', ''), ('il y a {}', ''),
               ('on voit {}', ''))
  conjunction = ' et '
  _NOUNS = (('cercle', 'm'), ('carré', 'm'), ('triangle', 'm'),
            ('étoile', 'f'), ('croix', 'f'), ('losange', 'm'))
  _SIZES = ({'m': 'petit', 'f': 'petite'}, {'m': 'grand', 'f': 'grande'})
  _COLOURS = (('rouge', 'rouge'), ('vert', 'verte'), ('bleu', 'bleue'),
              ('jaune', 'jaune'), ('violet', 'violette'), ('orange', 'orange'),
              ('blanc', 'blanche'), ('noir', 'noire'))
  _RELATIONS = {'left': 'à gauche', 'right': 'à droite', 'above': 'au-dessus',
                'below': 'en dessous'}

  def _phrase(self, obj):
    """Noun phrase without article: size before, colour after the noun."""
    noun, gender = self._NOUNS[obj.shape]
    colour = self._COLOURS[obj.colour][gender == 'f']
    return f'{self._SIZES[obj.size][gender]} {noun} {colour}'

  def subject(self, obj, case):
    article = 'une' if self._NOUNS[obj.shape][1] == 'f' else 'un'
    return f'{article} {self._phrase(obj)}'

  def relation(self, rel, ref, definite):
    feminine = self._NOUNS[ref.shape][1] == 'f'
    if definite:
      de = 'de la ' if feminine else 'du '
    else:
      de = "d'une " if feminine else "d'un "
    return f'{self._RELATIONS[rel]} {de}{self._phrase(ref)}'


class _Spanish(_Grammar):
  templates = (('{}', ''), ('una imagen con {}', ''), ('hay {}', ''),
               ('se puede ver {}', ''))
  conjunction = ' y '
  _NOUNS = (('círculo', 'm'), ('cuadrado', 'm'), ('triángulo', 'm'),
            ('estrella', 'f'), ('cruz', 'f'), ('rombo', 'm'))
  _SIZES = (('pequeño', 'pequeña'), ('grande', 'grande'))
  _COLOURS = (('rojo', 'roja'), ('verde', 'verde'), ('azul', 'azul'),
              ('amarillo', 'amarilla'), ('morado', 'morada'),
              ('naranja', 'naranja'), ('blanco', 'blanca'), ('negro', 'negra'))
  _RELATIONS = {'left': 'a la izquierda', 'right': 'a la derecha',
                'above': 'encima', 'below': 'debajo'}

  def _phrase(self, obj):
    """Noun phrase without article: noun, colour, size."""
    noun, gender = self._NOUNS[obj.shape]
    f = gender == 'f'
    return f'{noun} {self._COLOURS[obj.colour][f]} {self._SIZES[obj.size][f]}'

  def subject(self, obj, case):
    article = 'una' if self._NOUNS[obj.shape][1] == 'f' else 'un'
    return f'{article} {self._phrase(obj)}'

  def relation(self, rel, ref, definite):
    feminine = self._NOUNS[ref.shape][1] == 'f'
    if definite:
      de = 'de la ' if feminine else 'del '
    else:
      de = 'de una ' if feminine else 'de un '
    return f'{self._RELATIONS[rel]} {de}{self._phrase(ref)}'


_GRAMMARS = {'en': _English(), 'de': _German(), 'fr': _French(),
             'es': _Spanish()}


class SyntheticScenes:
  """Grain random-access source of rendered scenes with captions.

  Example i of a split is a pure function of (seed, split, i): the scene and
  the choice of caption template per language come from one generator seeded
  with [seed, split_id, i], then the language of `__getitem__`'s caption.
  """

  def __init__(self, split: str = 'train', num_examples: int = 100_000,
               image_size: int = 64, seed: int = 0,
               languages: tuple[str, ...] = LANGUAGES):
    if split not in SPLITS:
      raise ValueError(f'split {split!r} not in {sorted(SPLITS)}')
    unknown = set(languages) - set(LANGUAGES)
    if unknown or not languages:
      raise ValueError(f'languages must be a non-empty subset of {LANGUAGES}, '
                       f'got {languages}')
    self.split = split
    self.num_examples = num_examples
    self.image_size = image_size
    self.seed = seed
    self.languages = tuple(languages)

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f'SyntheticScenes(split={self.split!r}, '
            f'num_examples={self.num_examples}, image_size={self.image_size}, '
            f'seed={self.seed}, languages={self.languages})')

  def _sample(self, index: int) -> tuple[_Scene, dict[str, str], str]:
    """The scene, its caption per language and the language of the example."""
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range [0, {self.num_examples})')
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    scene = _sample_scene(rng)
    captions = {}
    for lang in self.languages:
      grammar = _GRAMMARS[lang]
      captions[lang] = grammar.describe(
          scene, int(rng.integers(len(grammar.templates))))
    language = self.languages[int(rng.integers(len(self.languages)))]
    return scene, captions, language

  def __getitem__(self, index: int) -> dict:
    scene, captions, language = self._sample(index)
    first = scene.objects[0]
    return {
        'image': _render(scene, self.image_size),
        'caption': captions[language],
        'language': language,
        'label': first.colour * len(SHAPES) + first.shape,
        'index': int(index),
    }

  def captions(self, index: int) -> list[tuple[str, str]]:
    """(language, caption) of the same scene, one per language."""
    _, captions, _ = self._sample(index)
    return list(captions.items())
