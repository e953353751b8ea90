"""Where examples come from: every source vlp reads, registered by name in one table
(SOURCES) that the training input, the evaluators and the config validation all use.

A name appears in three places of a config:
  config.data.name         the dataset of image-text pairs a run trains on (and its
                           held-out split, data.eval): a source with `dataset = True`;
  config.tasks.N.data      a task's data: a built-in source (`builtin = True`), or 'task'
                           for config.data;
  config.evals.N.data      an evaluator's: a source that can give retrieval pairs
                           (`retrieval`) or labelled images (`classification`), or 'task'
                           for config.data's held-out split.
A new format is a Source subclass registered here (or with `register`); nothing else
asks which source it reads.
"""
import dataclasses
import itertools
from collections.abc import Callable

from vlp.core import config as config_lib
from vlp.core.config import ConfigError, check
from vlp.data import arrayrecord, folder, karpathy, synthetic, synthetic_video, webdataset

TASK = 'task'  # a task's or an evaluator's data: config.data (its train or held-out split)


@dataclasses.dataclass(frozen=True)
class Stream:
  """Shards read front to back (img2dataset tars): the pipeline interleaves and shuffles them
  (vlp.data.streaming) instead of indexing examples."""
  shards: list
  read: Callable


class Source:
  name = ''
  vision = 'image'  # what its examples hold: 'image' or 'video'
  class_names: tuple = ()  # the classes of a labelled built-in source
  templates: tuple = ()  # prompts its class names are put in for zero-shot classification (): CLIP's
  builtin = False  # rendered by vlp: a task can train on it without a config section
  dataset = False  # config.data.name can name it
  retrieval = False  # an evaluator can retrieve over its image-caption pairs
  classification = False  # an evaluator can classify its labelled images

  def validate(self, d):
    """Checks config.data (a section naming this source); ConfigError naming the key."""

  def describe(self, config, e=None) -> str:
    """The data set's name in result records: config.data's held-out split, or an evaluator entry's."""
    return config.data.eval if e is None else e.path

  def validate_entry(self, e, key: str):
    """Checks an evaluator entry reading this source."""

  def train(self, config, image_size: int, frames: int = 0):
    """The train split: a random-access source of records, or a Stream."""
    raise NotImplementedError(f'{self.name!r} has no train split')

  def held_out(self, config):
    """config.data's held-out image-caption pairs (a random-access source), or None."""
    return None

  def eval_pairs(self, e, config):
    """The image-caption pairs of an evaluator entry (random access, `captions(i)` optional)."""
    raise NotImplementedError(f'{self.name!r} has no image-caption pairs to evaluate on')

  def labelled(self, e, config) -> tuple[list, list, list]:
    """(images: encoded bytes, files or uint8 arrays, labels, class names) of an evaluator entry."""
    raise NotImplementedError(f'{self.name!r} has no labelled images')


class Synthetic(Source):
  name, builtin, dataset, retrieval, classification = 'synthetic', True, True, True, True
  class_names = tuple(synthetic.CLASS_NAMES)
  # a class is the (colour, shape) of the first object a caption names
  templates = ('a small {}', 'a large {}', 'a picture of a small {}', 'a picture of a large {}',
               'there is a small {}', 'there is a large {}')

  def describe(self, config, e=None):
    return 'vlp/synthetic'

  def validate(self, d):
    check(set(d.languages) <= set(synthetic.LANGUAGES) and len(d.languages) > 0, 'data.languages',
          f'{d.languages!r}: choose from {", ".join(synthetic.LANGUAGES)}')

  def train(self, config, image_size, frames=0):
    d = config.data
    return synthetic.SyntheticScenes(split='train', num_examples=d.train_examples, image_size=image_size,
                                     seed=config.seed, languages=tuple(d.languages))

  def held_out(self, config):
    return self._test(config, config.data.eval_images, tuple(config.data.languages))

  def eval_pairs(self, e, config):
    return self._test(config, e.num_images or config.data.eval_images, tuple(config.data.languages))

  def labelled(self, e, config):
    scenes = self._test(config, e.num_images or config.data.eval_images)
    rows = [scenes[i] for i in range(len(scenes))]
    return [r['image'] for r in rows], [r['label'] for r in rows], list(self.class_names)

  @staticmethod
  def _test(config, n, languages=synthetic.LANGUAGES):
    return synthetic.SyntheticScenes(split='test', num_examples=n, image_size=config.model.image.image_size,
                                     seed=config.seed, languages=languages)


class SyntheticVideo(Source):
  name, vision, builtin, retrieval, classification = 'synthetic_video', 'video', True, True, True
  class_names = tuple(synthetic_video.VIDEO_CLASS_NAMES)
  # a class is the colour and motion of the first object ('red shape moving up')
  templates = ('a {}', 'a small {}', 'a large {}', 'a video of a {}', 'a clip showing a {}')

  def describe(self, config, e=None):
    return 'vlp/synthetic_video'

  def train(self, config, image_size, frames=0):
    return synthetic_video.SyntheticVideos(split='train', num_examples=config.data.train_examples,
                                           seed=config.seed, image_size=image_size, frames=frames)

  def eval_pairs(self, e, config):
    return synthetic_video.SyntheticVideos(split='test', num_examples=e.num_images or config.data.eval_images,
                                           image_size=config.model.image.image_size,
                                           frames=config.model.video.frames, seed=config.seed)

  def labelled(self, e, config):
    clips = self.eval_pairs(e, config)  # clips [T, S, S, 3] where the others have images
    rows = [clips[i] for i in range(len(clips))]
    return [r['video'] for r in rows], [r['label'] for r in rows], list(self.class_names)


def _paths(key, value):
  try:
    return config_lib.paths(value)
  except ValueError as e:
    raise ConfigError(f"config key '{key}': {e}") from None


def _held_out_files(config):
  """data.eval: ArrayRecord files (eval data may be converted while training streams tars), or
  tar shards, small enough to read whole into memory (bounded even if someone points eval at
  the train shards)."""
  d = config.data
  if not d.eval:
    return None
  paths = _paths('data.eval', d.eval)
  try:
    if d.name == 'arrayrecord' or all(map(arrayrecord.looks_like, paths)):
      return arrayrecord.Source(paths)
    shards = webdataset.expand(paths)
  except ValueError as e:
    raise ConfigError(f"config key 'data.eval': {e}") from None
  return list(itertools.islice(webdataset.read_shards(shards), 50 * d.eval_images))


class _Files(Source):
  dataset = True

  def validate(self, d):
    check(bool(d.train), 'data.train', f"data.name={d.name!r} needs the training shards' paths")

  def held_out(self, config):
    return _held_out_files(config)


class ArrayRecord(_Files):
  name = 'arrayrecord'

  def train(self, config, image_size, frames=0):
    try:
      return arrayrecord.Source(_paths('data.train', config.data.train))
    except ValueError as e:
      raise ConfigError(f"config key 'data.train': {e}") from None


class WebDataset(_Files):
  name = 'webdataset'

  def train(self, config, image_size, frames=0):
    try:
      return Stream(webdataset.expand(_paths('data.train', config.data.train)), webdataset.read_shard)
    except ValueError as e:
      raise ConfigError(f"config key 'data.train': {e}") from None


class Tfds(Source):
  """A prepared TFDS dataset: config.data.tfds for training, an evaluator's tfds_* keys."""
  name, dataset, retrieval, classification = 'tfds', True, True, True

  def validate(self, d):
    check(bool(d.tfds.name), 'data.tfds.name', "data.name='tfds' needs a TFDS dataset name")

  def validate_entry(self, e, key):
    check(bool(e.tfds_name), f'{key}.tfds_name', "data='tfds' needs a TFDS dataset name")

  def describe(self, config, e=None):
    return config.data.tfds.name if e is None else e.tfds_name

  def train(self, config, image_size, frames=0):
    t = config.data.tfds
    return self._source(t.name, t.train_split, t.data_dir, t.image_key, t.caption_key)

  def held_out(self, config):
    t = config.data.tfds
    return self._source(t.name, t.eval_split, t.data_dir, t.image_key, t.caption_key)

  def eval_pairs(self, e, config):
    return self._source(e.tfds_name, e.split, e.tfds_data_dir, e.image_key, e.caption_key)

  def labelled(self, e, config):
    from vlp.data import tfds_source  # imports tensorflow_datasets: only when asked for
    return tfds_source.labelled(e.tfds_name, e.split, e.tfds_data_dir or None, e.image_key, e.label_key,
                                e.num_images)

  @staticmethod
  def _source(name, split, data_dir, image_key, caption_key):
    from vlp.data import tfds_source  # imports tensorflow_datasets: only when asked for
    return tfds_source.TfdsSource(name, split, data_dir=data_dir or None, image_key=image_key,
                                  caption_key=caption_key)


class Karpathy(Source):
  """Karpathy-split caption JSON (COCO, Flickr30k) with its image folder: retrieval only."""
  name, retrieval = 'karpathy', True

  def validate_entry(self, e, key):
    check(bool(e.path and e.image_dir), f'{key}.path', "data='karpathy' needs path (the Karpathy JSON) and image_dir")

  def eval_pairs(self, e, config):
    return karpathy.KarpathySource(e.path, e.image_dir, e.split)


class Folder(Source):
  """ROOT/<class>/<image>: zero-shot classification only."""
  name, classification = 'folder', True

  def validate_entry(self, e, key):
    check(bool(e.path), f'{key}.path', "data='folder' needs path (one subfolder per class)")

  def labelled(self, e, config):
    return folder.image_folder(e.path, e.num_images)


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
  SOURCES[source.name] = source
  return source


for _source in (Synthetic(), SyntheticVideo(), ArrayRecord(), WebDataset(), Karpathy(), Folder(), Tfds()):
  register(_source)


def names(**wanted) -> tuple[str, ...]:
  """The names of the sources with the wanted capabilities, e.g. names(dataset=True)."""
  return tuple(n for n, s in SOURCES.items() if all(getattr(s, k) == v for k, v in wanted.items()))


def task_data() -> tuple[str, ...]:
  """What a task's data may name."""
  return (TASK, *names(builtin=True))


def eval_data(kind: str) -> tuple[str, ...]:
  """What an evaluator's data may name: retrieval kinds retrieve over pairs (config.data's held-out
  split too), 'zeroshot' classifies labelled images."""
  return names(classification=True) if kind == 'zeroshot' else (TASK, *names(retrieval=True))


def of_dataset(config) -> Source:
  return SOURCES[config.data.name]


def for_task(config, data: str) -> Source:
  """The source of a task's data: a built-in one, or config.data's ('task')."""
  return of_dataset(config) if data == TASK else SOURCES[data]


def vision_of(data: str) -> str:
  """What a task's data holds ('task': config.data, image-text pairs)."""
  return 'image' if data == TASK else SOURCES[data].vision


def validate(d):
  """config.data: a dataset vlp reads, with what it needs."""
  known = names(dataset=True)
  check(d.name in known, 'data.name', f'unknown dataset {d.name!r}; known: {", ".join(known)}')
  SOURCES[d.name].validate(d)
  lo, hi = d.crop_scale
  check(0 < lo <= hi <= 1, 'data.crop_scale', f'{tuple(d.crop_scale)} must be 0 < min <= max <= 1')
  check(d.max_pixels > 0, 'data.max_pixels', 'must be > 0')
  check(d.cycle_length >= 1 and d.shuffle_window >= 1, 'data.cycle_length',
        'cycle_length and shuffle_window must be >= 1')
  check(d.num_workers >= 0 and d.prefetch >= 1, 'data.num_workers', 'num_workers must be >= 0 and prefetch >= 1')


def validate_entry(e, key: str):
  """An evaluator entry's data."""
  allowed = eval_data(e.kind)
  check(e.data in allowed, f'{key}.data', f'{e.data!r} not in {"/".join(allowed)}')
  if e.data != TASK:
    SOURCES[e.data].validate_entry(e, key)
