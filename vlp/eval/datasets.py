"""Evaluation data: Karpathy-split caption JSON, image folders, TFDS label datasets, built-in scenes and clips.

Retrieval sets become the arrays of `eval_set.eval_arrays` (images with all
their captions); classification sets become images, labels and class names.
Everything is read once, at the model's image size, before any compiling;
each host decodes only its own images (image j is host j % hosts's), which
vlp.eval.embed then feeds to the devices.
"""
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from vlp import distributed, paths
from vlp.data import eval_set, pipeline, records, synthetic, synthetic_video
from vlp.eval import embed, imagenet, zeroshot

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')


class KarpathySource:
  """One split of a Karpathy-split caption file (`dataset_coco.json`,
  `dataset_flickr30k.json`): `images[]` with `split`, `filename`, optional
  `filepath` (COCO's 'val2014') and `sentences[].raw`. Images are read from
  `image_dir/[filepath/]filename`; a random-access source with `captions(i)`."""

  def __init__(self, path: str, image_dir: str, split: str = 'test'):
    with paths.open(path) as f:  # local or remote (gs://), as the images
      entries = json.load(f)['images']
    self.entries = [e for e in entries if e['split'] == split]
    if not self.entries:
      splits = sorted({e['split'] for e in entries})
      raise ValueError(f'{path}: no image of split {split!r}; splits there: {splits}')
    self.path, self.image_dir, self.split = path, image_dir, split

  def __len__(self):
    return len(self.entries)

  def file(self, index: int) -> str:
    e = self.entries[index]
    return paths.join(self.image_dir, *([e['filepath']] if e.get('filepath') else []), e['filename'])

  def __getitem__(self, index: int) -> dict:
    key = self.entries[index]['filename']
    try:
      image = paths.read_bytes(self.file(index))
    except FileNotFoundError:
      return records.skipped(key, 'missing_image')
    return records.make(key, image, self.entries[index]['sentences'][0]['raw'])

  def captions(self, index: int) -> list[tuple[str, str]]:
    return [('', s['raw']) for s in self.entries[index]['sentences']]

  def __repr__(self):
    return f'KarpathySource({self.path!r}, split={self.split!r}, {len(self)} images)'


def retrieval_source(e, config):
  """The random-access source an evaluator entry names (data != 'task')."""
  if e.data == 'synthetic':
    return synthetic.SyntheticScenes(split='test', num_examples=e.num_images or config.data.eval_images,
                                     image_size=config.model.image.image_size, seed=config.seed,
                                     languages=tuple(config.data.languages))
  if e.data == 'synthetic_video':
    return _test_videos(e, config)
  if e.data == 'karpathy':
    return KarpathySource(e.path, e.image_dir, e.split)
  from vlp.data import tfds_source  # imports tensorflow_datasets: only when asked for
  return tfds_source.TfdsSource(e.tfds_name, e.split, data_dir=e.tfds_data_dir or None,
                                image_key=e.image_key, caption_key=e.caption_key)


def _test_videos(e, config):
  return synthetic_video.SyntheticVideos(split='test', num_examples=e.num_images or config.data.eval_images,
                                         image_size=config.model.image.image_size,
                                         frames=config.model.video.frames, seed=config.seed)


def retrieval_data(e, config, tokenizer) -> dict:
  return eval_set.eval_arrays(retrieval_source(e, config), tokenizer,
                              num_images=e.num_images or config.data.eval_images,
                              context_length=config.model.text.context_length,
                              image_size=config.model.image.image_size, max_pixels=config.data.max_pixels,
                              hold_images=e.hold_images, **this_host())


def this_host() -> dict:
  """eval_arrays' host arguments for this process: which host it is, and how hosts agree."""
  return {'hosts': jax.process_count(), 'host': jax.process_index(),
          'agree': distributed.json_agree(multihost_utils.process_allgather)}


def _spread(n: int, limit: int) -> np.ndarray:
  """Up to `limit` indices spread evenly over range(n): files sorted by class
  keep every class in a subset."""
  return np.arange(n) if not limit or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)


class _Images:
  """A list of encoded images, arrays or image files as a source of records ({'image': ...})."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    image = self.images[i]
    return {'image': paths.read_bytes(image) if isinstance(image, str) else image}


def _load_images(images, image_size, max_pixels, ids, hold: bool):
  """Images `ids` of a list of encoded images, arrays or image files -> uint8 [len(ids), S, S, 3]
  (hold=False: an eval_set.StreamedImages of them, each decoded once here all the same, so that a
  bad one fails now, not in the middle of a run); raises on a bad one."""
  source, prep = _Images(images), pipeline.Preprocess(None, 0, image_size, train=False, max_pixels=max_pixels)
  held, shape = [], None
  for j in ids:
    pixels = prep.pixels(source[j]['image'], None)
    shape = pixels.shape
    if hold:
      held.append(pixels)
  return np.stack(held) if hold else eval_set.StreamedImages(source, prep, ids, shape)


def image_folder(root: str, limit: int = 0):
  """(files, labels, class_names) of ROOT/<class>/<image>: classes are the sorted
  subfolders, named by their folder name with '_' read as a space."""
  classes = _subfolders(root)
  if not classes:
    raise ValueError(f'{root}: no class subfolders')
  files, labels = [], []
  for c, name in enumerate(classes):
    for f in paths.listdir(paths.join(root, name)):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(paths.join(root, name, f))
        labels.append(c)
  keep = _spread(len(files), limit)
  return [files[i] for i in keep], np.asarray(labels)[keep], [c.replace('_', ' ') for c in classes]


def _subfolders(root: str) -> list[str]:
  """The class folders of ROOT: local subdirectories, or on an object store the prefixes
  that hold objects (an object store has no empty folders)."""
  if paths.is_remote(root):
    return sorted({paths.basename(paths.dirname(f)) for f in paths.glob(paths.join(root, '*', '*'))})
  return sorted(d for d in paths.listdir(root) if paths.isdir(paths.join(root, d)))


def _tfds_classification(e, limit):
  """Encoded images, labels and class names of a prepared TFDS dataset with a ClassLabel feature."""
  import tensorflow_datasets as tfds
  from vlp.data import tfds_source
  builder = tfds_source._builder(e.tfds_name, e.tfds_data_dir or None)
  label = builder.info.features[e.label_key]
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'{e.tfds_name}: feature {e.label_key!r} is {label!r}, not a ClassLabel')
  source = builder.as_data_source(split=e.split, decoders={e.image_key: tfds.decode.SkipDecoding()})
  rows = [source[int(i)] for i in _spread(len(source), limit)]
  return [r[e.image_key] for r in rows], np.asarray([r[e.label_key] for r in rows]), list(label.names)


def classification_data(e, config) -> dict:
  """image uint8 [n, S, S, 3] (clips: [n, T, S, S, 3]) of this host's images (image_rows: which),
  label int [N], class_names and templates of an evaluator entry."""
  size, max_pixels = config.model.image.image_size, config.data.max_pixels
  if e.data == 'synthetic':
    scenes = synthetic.SyntheticScenes(split='test', num_examples=e.num_images or config.data.eval_images,
                                       image_size=size, seed=config.seed)
    rows = [scenes[i] for i in range(len(scenes))]
    images, labels, names = [r['image'] for r in rows], [r['label'] for r in rows], synthetic.CLASS_NAMES
  elif e.data == 'synthetic_video':  # clips [T, S, S, 3] where the others have images
    clips = _test_videos(e, config)
    rows = [clips[i] for i in range(len(clips))]
    images, labels, names = [r['video'] for r in rows], [r['label'] for r in rows], synthetic_video.VIDEO_CLASS_NAMES
  elif e.data == 'folder':
    images, labels, names = image_folder(e.path, e.num_images)  # files: each host reads its own
  else:
    images, labels, names = _tfds_classification(e, e.num_images)
  default_templates = {'synthetic': zeroshot.SYNTHETIC_TEMPLATES, 'synthetic_video': zeroshot.VIDEO_TEMPLATES}
  templates = default_templates.get(e.data, zeroshot.CLIP_TEMPLATES)
  if not e.class_names and imagenet.are_wordnet_ids(names):  # ImageNet: CLIP's names, its 80 prompts
    names, templates = imagenet.readable(names), imagenet.templates()
  host = this_host()
  rows = embed.host_rows(len(images), host['hosts'], host['host'])
  return {'image': _load_images(images, size, max_pixels, rows['ids'], e.hold_images), 'image_rows': rows,
          'label': np.asarray(labels, np.int32),
          'class_names': list(e.class_names) or list(names), 'templates': tuple(e.templates) or templates}
