"""Grain input pipelines: image-text training batches and retrieval eval data.

The training graph is index based (MapDataset) up to the batch, so an
iterator's state is a handful of integers: checkpoints stay tiny and a resumed
job, in a new process and with the same worker count, continues with exactly
the batches it would have seen.
"""
from typing import Any, Protocol

from absl import flags
import grain
from grain.experimental import ThreadPrefetchIterDataset
import numpy as np

from vlp.data import tokenizer as tokenizer_lib
from vlp.data import transforms


class ImageTextSource(Protocol):
  """A random-access source of {'image': uint8 [H,W,3], 'caption': str}."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


class ImageText:
  """Source example -> model inputs {'image': float32, 'text': int32 [L]}.

  A class rather than a closure so Grain can pickle it into worker processes.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, context_length: int):
    self.tokenizer = tokenizer
    self.context_length = context_length

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        'image': transforms.normalize_image(example['image']),
        'text': self.tokenizer.encode([example['caption']],
                                      self.context_length)[0],
    }


def train_dataset(source: ImageTextSource,
                  tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int,
                  context_length: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Endless per-process batches {'image': [B,H,W,3], 'text': [B,L]}.

  All processes shuffle the same global order (a new permutation per epoch)
  and take every process_count-th example of it from process_index on: the
  shares are disjoint and together cover each epoch. batch_size is per
  process.
  """
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count]
  ds = ds.map(ImageText(tokenizer, context_length))
  ds = ds.batch(batch_size, drop_remainder=True)
  # No read threads here: make_iterator decides where the work runs.
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0))


def make_iterator(dataset: grain.IterDataset, num_workers: int,
                  prefetch: int) -> grain.DatasetIterator:
  """Iterator with get_state()/set_state() whose batches are made ahead.

  With num_workers > 0, worker processes each make every num_workers-th batch
  (up to `prefetch` ahead), so rendering and decoding do not hold the GIL of
  the training loop; the batches are the same as with num_workers=0, which
  makes them in one background thread. The state is a JSON-serialisable dict
  that only an iterator with the same num_workers can restore.
  """
  if num_workers > 0:
    # Grain reads its absl flags when it starts workers; a program that never
    # parsed flags (no absl.app) runs with their defaults instead of failing.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  else:
    dataset = ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
  return iter(dataset)


def eval_arrays(source, tokenizer: tokenizer_lib.Tokenizer, *,
                num_images: int, context_length: int) -> dict[str, np.ndarray]:
  """The first num_images of source with all their captions, for retrieval.

  source also needs `captions(i) -> [(language, caption), ...]`. Returns
  image float32 [N,H,W,3], text int32 [M,L] and text_to_image int32 [M]: the
  image index of every caption.
  """
  images, texts, text_to_image = [], [], []
  for i in range(num_images):
    images.append(transforms.normalize_image(source[i]['image']))
    for _, caption in source.captions(i):
      texts.append(caption)
      text_to_image.append(i)
  return {
      'image': np.stack(images),
      'text': tokenizer.encode(texts, context_length),
      'text_to_image': np.asarray(text_to_image, np.int32),
  }
