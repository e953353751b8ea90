"""What one training task reads: tokenizer, train iterator and held-out data.

The data comes per process, its share of the global batch, from the dataset
that `config.data.name` names: the built-in scenes, vlp ArrayRecord files,
img2dataset webdataset shards (streamed) or a TFDS dataset.
"""
import itertools

import jax

from vlp import config as config_lib, models
from vlp.config import ConfigError
from vlp.data import arrayrecord, pipeline, synthetic, synthetic_video, tokenizer as tok, webdataset
from vlp.train import agd


def tokenizer_for(config) -> tok.Tokenizer:
  t = tok.builtin_tokenizer() if config.data.tokenizer == 'builtin' else tok.Tokenizer(config.data.tokenizer)
  if t.vocab_size > config.model.text.vocab_size:
    raise ConfigError(f"config key 'model.text.vocab_size': {config.model.text.vocab_size} is smaller "
                      f'than the tokenizer vocabulary ({t.vocab_size})')
  return t


def _paths_error(key, e):
  return ConfigError(f"config key '{key}': {e}")


def _random_access_source(config, split: str, image_size: int | None = None):
  """The train or eval split as a random-access source, or None when there is none."""
  d = config.data
  if d.name == 'synthetic':
    n = d.train_examples if split == 'train' else d.eval_images
    return synthetic.SyntheticScenes(split='train' if split == 'train' else 'test', num_examples=n,
                                     image_size=image_size or config.model.image.image_size, seed=config.seed,
                                     languages=tuple(d.languages))
  if d.name == 'tfds':
    from vlp.data import tfds_source  # imports tensorflow_datasets: only when asked for
    t = d.tfds
    return tfds_source.TfdsSource(t.name, t.train_split if split == 'train' else t.eval_split,
                                  data_dir=t.data_dir or None, image_key=t.image_key,
                                  caption_key=t.caption_key)
  key = f'data.{split}'
  if not d[split]:
    return None
  paths = config_lib.paths(d[split])
  try:
    # eval data may be converted while training streams tars, or not
    if d.name == 'arrayrecord' or (split == 'eval' and all(map(arrayrecord.looks_like, paths))):
      return arrayrecord.Source(paths)
    # webdataset eval shards are small: read them whole into memory
    shards = webdataset.expand(paths)
  except ValueError as e:
    raise _paths_error(key, e) from None
  limit = 50 * d.eval_images  # bounded even if someone points eval at the train shards
  return list(itertools.islice(webdataset.read_shards(shards), limit))


def preprocess(config, tokenizer, train: bool, variant: agd.Variant | None = None) -> pipeline.Preprocess:
  """The example maker of config.data, or of an IMP task's variant: at its resolution, with
  the caption only where the task has text and the label only for classification."""
  d = config.data
  task = variant.cfg if variant is not None and variant.task else None
  mlm = train and 'mlm_text' in models.module(config.model).BATCH_KEYS
  keys = dict(text='text' in task.modalities, label=task.loss == 'classification') if task else {}
  size = variant.image_size if variant is not None else config.model.image.image_size
  return pipeline.Preprocess(tokenizer, config.model.text.context_length, size,
                             train=train, crop_scale=tuple(d.crop_scale), flip=d.flip,
                             max_pixels=d.max_pixels, mlm_prob=config.albef.mlm_prob if mlm else 0.0, **keys)


def _task_source(config, variant):
  """The train split an IMP task reads, rendered or cropped at the variant's resolution."""
  t, d = variant.cfg, config.data
  if t.data == 'synthetic_video':
    return synthetic_video.SyntheticVideos(split='train', num_examples=d.train_examples, seed=config.seed,
                                           image_size=variant.image_size, frames=variant.frames)
  if t.data == 'synthetic':
    return synthetic.SyntheticScenes(split='train', num_examples=d.train_examples, seed=config.seed,
                                     image_size=variant.image_size, languages=tuple(d.languages))
  return _random_access_source(config, 'train', variant.image_size)  # 'task': config.data


def train_iterator(config, tokenizer, variant: agd.Variant | None = None):
  """Grain iterator of this process's share of each global batch (checkpointable), of
  config.data, or of an IMP task's variant (its data, batch size and resolution)."""
  d = config.data
  variant = variant or agd.variants(config)[0]
  # each task its own order of examples: tasks reading the same data see different ones
  seed = config.seed + 1009 * (variant.index + 1) if variant.task else config.seed
  common = dict(batch_size=variant.batch_size // jax.process_count(), seed=seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  prep = preprocess(config, tokenizer, train=True, variant=variant)
  if d.name == 'webdataset' and (not variant.task or variant.cfg.data == 'task'):
    try:
      shards = webdataset.expand(config_lib.paths(d.train))
    except ValueError as e:
      raise _paths_error('data.train', e) from None
    dataset = pipeline.stream_dataset(shards, webdataset.read_shard, prep, cycle_length=d.cycle_length,
                                      shuffle_window=d.shuffle_window, **common)
  else:
    source = _task_source(config, variant) if variant.task else _random_access_source(config, 'train')
    dataset = pipeline.train_dataset(source, prep, **common)
  return pipeline.make_iterator(dataset, num_workers=d.num_workers, prefetch=d.prefetch)


def eval_data(config, tokenizer) -> dict | None:
  """Held-out images with all their captions, or None when the config names no eval data."""
  source = _random_access_source(config, 'eval')
  if source is None:
    return None
  return pipeline.eval_arrays(source, tokenizer, num_images=config.data.eval_images,
                              context_length=config.model.text.context_length,
                              image_size=config.model.image.image_size,
                              max_pixels=config.data.max_pixels)
