"""Grain input pipelines: image-text training batches and retrieval eval data.

The training graph is index based (MapDataset) up to the batch, so an
iterator's state is a handful of integers: checkpoints stay tiny and a resumed
job, in a new process and with the same worker count, continues with exactly
the batches it would have seen.
"""
import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from absl import flags
import grain
from grain.experimental import ThreadPrefetchIterDataset
import numpy as np

from vlp.data import records, streaming, tokenizer as tokenizer_lib, transforms


class ImageTextSource(Protocol):
  """A random-access source of records (vlp.data.records): 'image' is encoded
  bytes or a uint8 [H,W,3] array, 'caption' a str."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


class Preprocess:
  """record -> {'image': uint8 [S,S,3], 'text': int32 [L]}, or a skipped record.

  Encoded images are decoded and cropped here (random-resized crop for
  training, resize + centre crop otherwise); arrays (the built-in scenes and
  clips, already rendered at the model's size) pass through; a record with a
  'video' (uint8 [T,S,S,3]) gives 'video' instead of 'image'. text=False leaves
  the caption out (classification), label=True keeps the record's int label.
  A record that cannot become an example comes out as `records.skipped(key,
  reason)`, for the batcher to count. `transform(example, rng)`, when given, adds
  what a model needs besides (a recipe's example transform: ALBEF's MLM inputs),
  with the example's own random generator, so a resumed run makes the same. A
  class rather than a closure so Grain can pickle it into workers.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, context_length: int,
               image_size: int | None = None, *, train: bool = True,
               crop_scale: tuple[float, float] = (0.5, 1.0), flip: bool = False,
               max_pixels: int = transforms.MAX_PIXELS, text: bool = True, label: bool = False,
               transform: Callable[[dict, np.random.Generator], dict] | None = None):
    self.tokenizer, self.context_length, self.image_size = tokenizer, context_length, image_size
    self.text, self.label, self.transform = text, label, transform
    self.train, self.crop_scale, self.flip, self.max_pixels = train, tuple(crop_scale), flip, max_pixels

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if records.is_skipped(record):
      return record
    caption = ' '.join(str(record.get('caption') or '').split())
    if self.text and not caption:
      return records.skipped(record.get('key', '?'), 'empty_caption')
    vision = 'video' if 'video' in record else 'image'
    try:
      pixels = self.pixels(record[vision], rng)
    except transforms.BadImage as e:
      return records.skipped(record.get('key', '?'), e.reason)
    example = {vision: pixels}  # uint8: normalised on the device (vlp.core.pixels.model_input)
    if self.label:
      example['label'] = np.int32(record['label'])
    if self.text:
      example['text'] = self.tokenizer.encode([caption], self.context_length)[0]
    return self.transform(example, rng) if self.transform else example

  def pixels(self, image, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 [S,S,3] of an encoded image or an array; raises transforms.BadImage."""
    if isinstance(image, np.ndarray):
      return image
    size = self.image_size
    if self.train:
      pixels = transforms.random_resized_crop(image, size, rng, scale=self.crop_scale,
                                              max_pixels=self.max_pixels)
      return transforms.flip_left_right(pixels, rng) if self.flip else pixels
    return transforms.resize_center_crop(image, size, max_pixels=self.max_pixels)


class NoUsableData(RuntimeError):
  """Every record of a long stretch was skipped: the data, not the model, is broken."""


class _SkipCountingBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, max_skips: int):
    super().__init__(parent)
    self._batch_size, self._max_skips = batch_size, max_skips

  def __next__(self) -> dict[str, Any]:
    examples, skipped = [], collections.Counter()
    while len(examples) < self._batch_size:
      example = next(self._parent)
      if records.is_skipped(example):
        skipped[example[records.SKIP]] += 1
        lost = sum(skipped.values()) - skipped[records.RETRIED]  # a retry note is no loss
        if lost > self._max_skips:
          raise NoUsableData(f'{lost} records in a row could not be used '
                             f'({dict(skipped)}); check the data with `vlp data check`')
      else:
        examples.append(example)
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch['skipped'] = dict(skipped)  # reason -> count since the previous batch (and the storage's retries)
    return batch

  # A state is only taken between batches, when nothing is held back here.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipCountingBatch(grain.IterDataset):
  """Batches of usable examples; skipped records are counted, by reason, in batch['skipped'].

  The counts ride with the batch through worker processes, so the training
  loop adds them to its metrics and nothing is lost or counted twice.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, max_skips: int | None = None):
    super().__init__(parent)
    self.batch_size = batch_size
    self.max_skips = max_skips if max_skips is not None else 100 * batch_size

  def __iter__(self):
    return _SkipCountingBatchIterator(self._parent.__iter__(), self.batch_size, self.max_skips)


def train_dataset(source: ImageTextSource, preprocess: Preprocess | tokenizer_lib.Tokenizer, *,
                  batch_size: int, seed: int, context_length: int | None = None,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless per-process batches {'image': [B,H,W,3], 'text': [B,L], 'skipped': {...}}.

  All processes shuffle the same global order (a new permutation per epoch)
  and take every process_count-th example of it from process_index on: the
  shares are disjoint and together cover each epoch, and together they are
  the examples (with the same augmentation) one process would have read. batch_size is per
  process. A bare tokenizer means Preprocess(tokenizer, context_length).
  """
  if isinstance(preprocess, tokenizer_lib.Tokenizer):
    preprocess = Preprocess(preprocess, context_length)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  # Random augmentation before the split: an example's crop depends on its place
  # in the global order, not on the process count, so N processes see the same
  # global batches as one (lazily: each process preprocesses only its share).
  ds = ds.random_map(preprocess, seed=seed)
  ds = ds[process_index::process_count]
  # No read threads here: make_iterator decides where the work runs.
  return SkipCountingBatch(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), batch_size)


def stream_dataset(paths: Sequence[str], read: Callable[[str], Iterator[dict]],
                   preprocess: Preprocess, *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1, cycle_length: int = 4,
                   shuffle_window: int = 1000) -> grain.IterDataset:
  """Like train_dataset, over shards read front to back (see vlp.data.streaming): every
  (process, worker) reads its own part of the shards and preprocesses with its own seed."""
  ds = streaming.shard_stream(paths, read, seed=seed, process_index=process_index,
                              process_count=process_count, cycle_length=cycle_length,
                              shuffle_window=shuffle_window, transform=preprocess)
  return SkipCountingBatch(ds, batch_size)


def make_iterator(dataset: grain.IterDataset, num_workers: int,
                  prefetch: int) -> grain.DatasetIterator:
  """Iterator with get_state()/set_state() whose batches are made ahead.

  With num_workers > 0, worker processes make the batches (up to `prefetch`
  ahead each), so decoding does not hold the GIL of the training loop: worker
  w batches examples w, w+W, w+2W... of the stream that num_workers=0 batches
  in one background thread, and the workers' batches are taken in turn, so
  every W consecutive batches hold the same examples as without workers.
  Batches are determined by the seed and the worker count; the state is a
  JSON-serialisable dict that only an iterator with the same num_workers can
  restore.
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
