"""Evaluation data: Karpathy-split caption JSON, image folders, TFDS label datasets, built-in scenes and clips.

Retrieval sets become the arrays of `pipeline.eval_arrays` (images with all
their captions); classification sets become images, labels and class names.
Everything is read once, at the model's image size, before any compiling.
"""
import json

import numpy as np

from vlp import paths
from vlp.data import pipeline, records, synthetic, synthetic_video, transforms
from vlp.eval import imagenet, zeroshot

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
  return pipeline.eval_arrays(retrieval_source(e, config), tokenizer,
                              num_images=e.num_images or config.data.eval_images,
                              context_length=config.model.text.context_length,
                              image_size=config.model.image.image_size, max_pixels=config.data.max_pixels)


def _spread(n: int, limit: int) -> np.ndarray:
  """Up to `limit` indices spread evenly over range(n): files sorted by class
  keep every class in a subset."""
  return np.arange(n) if not limit or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)


def _load_images(images, image_size, max_pixels):
  """Encoded images (or arrays) -> float32 [N, S, S, 3] in [-1, 1]; raises on a bad one."""
  out = []
  for image in images:
    pixels = image if isinstance(image, np.ndarray) else transforms.resize_center_crop(
        image, image_size, max_pixels=max_pixels)
    out.append(transforms.normalize_image(pixels))
  return np.stack(out)


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
  """image float32 [N, S, S, 3] (clips: [N, T, S, S, 3]), label int [N], class_names of an evaluator entry."""
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
    files, labels, names = image_folder(e.path, e.num_images)
    images = []
    for path in files:
      images.append(paths.read_bytes(path))
  else:
    images, labels, names = _tfds_classification(e, e.num_images)
  default_templates = {'synthetic': zeroshot.SYNTHETIC_TEMPLATES, 'synthetic_video': zeroshot.VIDEO_TEMPLATES}
  templates = default_templates.get(e.data, zeroshot.CLIP_TEMPLATES)
  if not e.class_names and imagenet.are_wordnet_ids(names):  # ImageNet: CLIP's names, its 80 prompts
    names, templates = imagenet.readable(names), imagenet.templates()
  return {'image': _load_images(images, size, max_pixels), 'label': np.asarray(labels, np.int32),
          'class_names': list(e.class_names) or list(names), 'templates': tuple(e.templates) or templates}
