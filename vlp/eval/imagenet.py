"""ImageNet-1k zero-shot as the literature reports it: CLIP's class names and prompt templates.

TFDS `imagenet2012` and the usual ImageNet folder layout (`train/n01440764/...`) name
their classes by WordNet id, which makes a prompt read "a photo of a n01440764.". The
CLIP paper (and clip_benchmark, open_clip) use a hand-cleaned English name per class
and 80 templates; vlp ships that table (vlp/data/assets/imagenet_clip.json, with its
sources) and reads WordNet ids through it.
"""
import functools
import json
import re
from importlib import resources

WORDNET_ID = re.compile(r'^n\d{8}$')


@functools.cache
def _table() -> dict:
  with resources.files('vlp.data').joinpath('assets/imagenet_clip.json').open(encoding='utf-8') as f:
    return json.load(f)


def templates() -> tuple[str, ...]:
  """CLIP's 80 ImageNet prompt templates, each with one '{}' for the class name."""
  return tuple(_table()['templates'])


def class_names() -> tuple[str, ...]:
  """CLIP's 1000 class names in ImageNet-1k's label order (the sorted WordNet ids)."""
  return tuple(_table()['class_names'])


def are_wordnet_ids(names) -> bool:
  return bool(names) and all(WORDNET_ID.match(n) for n in names)


def readable(names: list[str]) -> list[str]:
  """CLIP's names of classes named by WordNet id, in their order; any other names unchanged.
  A WordNet id outside ImageNet-1k is an error naming it (a prompt built on it means nothing)."""
  if not are_wordnet_ids(names):
    return list(names)
  table = dict(zip(_table()['wnids'], _table()['class_names']))
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f'{len(unknown)} class(es) named by WordNet ids outside ImageNet-1k, e.g. '
                     f'{unknown[:3]}: give their names with class_names=')
  return [table[n] for n in names]
