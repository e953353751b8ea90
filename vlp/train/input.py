"""What a variant of the plan trains on: this process's share of each global batch, from its
task's source (vlp.data.sources: the built-in scenes or clips, or config.data: ArrayRecord
files, img2dataset tars streamed, a TFDS dataset), rendered or cropped at the variant's
resolution, with exactly the keys of its batch spec.
"""
import jax

from vlp.data import pipeline, sources


def preprocess(plan, tokenizer, variant) -> pipeline.Preprocess:
  """The example maker of a variant: its resolution, the caption and label where its batch spec
  has them, and the recipe's example transform (what else its model needs of an example)."""
  config, d = plan.config, plan.config.data
  return pipeline.Preprocess(tokenizer, config.model.text.context_length, variant.image_size, train=True,
                             crop_scale=tuple(d.crop_scale), flip=d.flip, max_pixels=d.max_pixels,
                             text='text' in variant.spec, label='label' in variant.spec,
                             transform=plan.recipe.example_transform(config, variant, tokenizer))


def train_iterator(plan, tokenizer, variant):
  """Grain iterator of this process's share of each global batch of a variant (its data, batch
  size and resolution); checkpointable."""
  config, d = plan.config, plan.config.data
  common = dict(batch_size=variant.batch_size // jax.process_count(), seed=variant.seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  prep = preprocess(plan, tokenizer, variant)
  source = sources.for_task(config, variant.cfg.data).train(config, variant.image_size, variant.frames)
  if isinstance(source, sources.Stream):
    dataset = pipeline.stream_dataset(source.shards, source.read, prep, cycle_length=d.cycle_length,
                                      shuffle_window=d.shuffle_window, **common)
  else:
    dataset = pipeline.train_dataset(source, prep, **common)
  return pipeline.make_iterator(dataset, num_workers=d.num_workers, prefetch=d.prefetch)
