"""What one training task reads: tokenizer, train iterator and held-out data.

The walking skeleton has one task (image-text contrastive on the built-in
dataset); the data comes per process, its share of the global batch.
"""
import jax

from vlp.config import ConfigError
from vlp.data import pipeline, synthetic, tokenizer as tok


def tokenizer_for(config) -> tok.Tokenizer:
  t = tok.builtin_tokenizer() if config.data.tokenizer == 'builtin' else tok.Tokenizer(config.data.tokenizer)
  if t.vocab_size > config.model.text.vocab_size:
    raise ConfigError(f"config key 'model.text.vocab_size': {config.model.text.vocab_size} is smaller "
                      f'than the tokenizer vocabulary ({t.vocab_size})')
  return t


def _source(config, split, num_examples):
  return synthetic.SyntheticScenes(split=split, num_examples=num_examples,
                                   image_size=config.model.image.image_size, seed=config.seed,
                                   languages=tuple(config.data.languages))


def train_iterator(config, tokenizer):
  """Grain iterator of this process's share of each global batch (checkpointable)."""
  dataset = pipeline.train_dataset(
      _source(config, 'train', config.data.train_examples), tokenizer,
      batch_size=config.batch_size // jax.process_count(),
      context_length=config.model.text.context_length, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_iterator(dataset, num_workers=config.data.num_workers, prefetch=config.data.prefetch)


def eval_data(config, tokenizer) -> dict:
  """Held-out scenes, one caption per language each."""
  return pipeline.eval_arrays(_source(config, 'test', config.data.eval_images), tokenizer,
                              num_images=config.data.eval_images,
                              context_length=config.model.text.context_length)
