"""What a variant of the plan reads: tokenizer, train iterator, and the held-out data.

The data comes per process, its share of the global batch: a task's built-in
scenes or clips, or (`data='task'`, the default task) the dataset that
`config.data.name` names: the built-in scenes, vlp ArrayRecord files,
img2dataset webdataset shards (streamed) or a TFDS dataset. Examples hold
exactly the keys of the variant's batch spec.
"""
import itertools

import jax

from vlp import config as config_lib
from vlp.config import ConfigError
from vlp.data import arrayrecord, eval_set, pipeline, synthetic, synthetic_video, webdataset
from vlp.data.tokenizer import for_config as tokenizer_for  # noqa: F401 - callers use tasks.tokenizer_for


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


def preprocess(plan, tokenizer, train: bool, variant) -> pipeline.Preprocess:
  """The example maker of a variant: its resolution, and the caption, MLM inputs and label
  where its batch spec has them."""
  config, d = plan.config, plan.config.data
  options = plan.recipe.preprocess_options(config)
  mlm_prob = options.get('mlm_prob', 0.0) if train and 'mlm_text' in variant.spec else 0.0
  return pipeline.Preprocess(tokenizer, config.model.text.context_length, variant.image_size,
                             train=train, crop_scale=tuple(d.crop_scale), flip=d.flip,
                             max_pixels=d.max_pixels, mlm_prob=mlm_prob,
                             text='text' in variant.spec, label='label' in variant.spec)


def _task_source(config, variant):
  """The train split a task reads, rendered or cropped at the variant's resolution."""
  t, d = variant.cfg, config.data
  if t.data == 'synthetic_video':
    return synthetic_video.SyntheticVideos(split='train', num_examples=d.train_examples, seed=config.seed,
                                           image_size=variant.image_size, frames=variant.frames)
  if t.data == 'synthetic':
    return synthetic.SyntheticScenes(split='train', num_examples=d.train_examples, seed=config.seed,
                                     image_size=variant.image_size, languages=tuple(d.languages))
  return _random_access_source(config, 'train', variant.image_size)  # 'task': config.data


def train_iterator(plan, tokenizer, variant):
  """Grain iterator of this process's share of each global batch of a variant (its data,
  batch size and resolution); checkpointable."""
  config, d = plan.config, plan.config.data
  common = dict(batch_size=variant.batch_size // jax.process_count(), seed=variant.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  prep = preprocess(plan, tokenizer, train=True, variant=variant)
  if d.name == 'webdataset' and variant.cfg.data == 'task':
    try:
      shards = webdataset.expand(config_lib.paths(d.train))
    except ValueError as e:
      raise _paths_error('data.train', e) from None
    dataset = pipeline.stream_dataset(shards, webdataset.read_shard, prep, cycle_length=d.cycle_length,
                                      shuffle_window=d.shuffle_window, **common)
  else:
    dataset = pipeline.train_dataset(_task_source(config, variant), prep, **common)
  return pipeline.make_iterator(dataset, num_workers=d.num_workers, prefetch=d.prefetch)


def eval_data(config, tokenizer, **hosts) -> dict | None:
  """Held-out images with all their captions, or None when the config names no eval data;
  hosts: eval_set.eval_arrays' (one host, all the images, unless given)."""
  source = _random_access_source(config, 'eval')
  if source is None:
    return None
  return eval_set.eval_arrays(source, tokenizer, num_images=config.data.eval_images,
                              context_length=config.model.text.context_length,
                              image_size=config.model.image.image_size,
                              max_pixels=config.data.max_pixels, **hosts)
