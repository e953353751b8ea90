"""Evaluation data of an evaluator entry, read through the sources table (vlp.data.sources):
retrieval sets become the arrays of `eval_set.eval_arrays` (images with all their captions);
classification sets become images, labels and class names.
Everything is read once, at the model's image size, before any compiling;
each host decodes only its own images (image j is host j % hosts's), which
vlp.eval.embed then feeds to the devices.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from vlp.core import distributed, paths
from vlp.data import eval_set, pipeline, sources
from vlp.eval import embed, imagenet, zeroshot


def retrieval_data(e, config, tokenizer) -> dict:
  """The image-caption pairs an evaluator entry names (data != 'task')."""
  return eval_set.eval_arrays(sources.SOURCES[e.data].eval_pairs(e, config), tokenizer,
                              num_images=e.num_images or config.data.eval_images,
                              context_length=config.model.text.context_length,
                              image_size=config.model.image.image_size, max_pixels=config.data.max_pixels,
                              hold_images=e.hold_images, **this_host())


def task_data(config, tokenizer, **hosts) -> dict | None:
  """config.data's held-out images with all their captions, or None when the config names none;
  hosts: eval_set.eval_arrays' (one host, all the images, unless given)."""
  source = sources.of_dataset(config).held_out(config)
  if source is None:
    return None
  return eval_set.eval_arrays(source, tokenizer, num_images=config.data.eval_images,
                              context_length=config.model.text.context_length,
                              image_size=config.model.image.image_size,
                              max_pixels=config.data.max_pixels, **hosts)


def this_host() -> dict:
  """eval_arrays' host arguments for this process: which host it is, and how hosts agree."""
  return {'hosts': jax.process_count(), 'host': jax.process_index(),
          'agree': distributed.json_agree(multihost_utils.process_allgather)}


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


def classification_data(e, config) -> dict:
  """image uint8 [n, S, S, 3] (clips: [n, T, S, S, 3]) of this host's images (image_rows: which),
  label int [N], class_names and templates of an evaluator entry."""
  size, max_pixels = config.model.image.image_size, config.data.max_pixels
  source = sources.SOURCES[e.data]
  images, labels, names = source.labelled(e, config)  # files: each host reads its own
  templates = source.templates or zeroshot.CLIP_TEMPLATES
  if not e.class_names and imagenet.are_wordnet_ids(names):  # ImageNet: CLIP's names, its 80 prompts
    names, templates = imagenet.readable(names), imagenet.templates()
  host = this_host()
  rows = embed.host_rows(len(images), host['hosts'], host['host'])
  return {'image': _load_images(images, size, max_pixels, rows['ids'], e.hold_images), 'image_rows': rows,
          'label': np.asarray(labels, np.int32),
          'class_names': list(e.class_names) or list(names), 'templates': tuple(e.templates) or templates}
