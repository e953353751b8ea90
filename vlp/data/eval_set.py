"""A retrieval eval set (images with all their captions), each host decoding only its own images.

Every host reads the same records and captions, so all agree on which
records are the set's images and on every caption; image j is decoded only
by host j % hosts and held there as uint8 (big_vision's host-sharded eval,
with vlp.eval.embed feeding each host's rows). An image that cannot be used
(a skipped record, a bad image file, no caption) is left out of the set and
counted, on every host (`agree` shares what each host found); it is not
replaced by a later record, so the set is the same for any number of hosts.
"""
import collections
import hashlib

import numpy as np

from vlp.data import records, tokenizer as tokenizer_lib, transforms
from vlp.data.pipeline import NoUsableData, Preprocess


def eval_arrays(source, tokenizer: tokenizer_lib.Tokenizer, *, num_images: int, context_length: int,
                image_size: int | None = None, max_pixels: int = transforms.MAX_PIXELS,
                hosts: int = 1, host: int = 0, agree=None, hold_images: bool = True) -> dict:
  """The first num_images distinct images of source with all their captions.

  A source with `captions(i) -> [(language, caption), ...]` (the built-in
  scenes, TFDS COCO) has one image per record, with every caption; otherwise
  records whose image bytes are identical are one image with several captions
  (image-caption pairs as converted to ArrayRecord). Images are resized and
  centre-cropped. Returns image uint8 [n, H, W, 3] (this host's images: all of
  them with one host), image_rows ({'ids', 'total', 'most'} as
  vlp.eval.embed.host_rows: which rows of the set those are), text int32
  [M, L], text_to_image int32 [M] (the image of every caption), language [M]
  (str, '' when unknown) and 'skipped': {reason: count}. With hosts > 1, agree(this host's {image index: reason}) -> every
  host's (vlp.eval.datasets gives one over jax.distributed). hold_images=False
  keeps no pixels: 'image' is a `StreamedImages` that reads and decodes the
  rows asked for (each eval decodes its batches again; for sets larger than a
  host's memory).
  """
  prep = Preprocess(tokenizer, context_length, image_size, train=False, max_pixels=max_pixels)
  owned, bad = {}, {}  # this host's images: index -> uint8 pixels; index -> why it cannot be used
  texts, text_to_image, languages, skipped = [], [], [], collections.Counter()
  slots = _by_record if hasattr(source, 'captions') else _by_bytes
  n = 0
  for i, j, captions, record in slots(source, num_images, hosts, host, skipped, bad):
    n = max(n, j + 1)
    if record is not None:  # this host decodes image j (and holds it, or where to read it again)
      try:
        pixels = prep.pixels(_vision(record), None)
        owned[j] = pixels if hold_images else (i, pixels.shape)
      except transforms.BadImage as e:
        bad[j] = e.reason
    for lang, caption in captions:
      if caption:
        texts.append(caption)
        text_to_image.append(j)
        languages.append(lang)
  if hosts > 1:
    bad = agree(bad)
  skipped.update(bad.values())
  good = np.asarray([j for j in range(n) if j not in bad], np.int64)
  per_host = np.bincount(good % hosts, minlength=hosts)  # each host keeps the images it decoded
  if per_host.min() == 0:
    raise NoUsableData(f'no usable eval image in {source!r} (skipped: {dict(skipped)})' if not good.size else
                       f'{len(good)} usable eval images in {source!r}: a host has none of them '
                       f'({hosts} hosts; skipped: {dict(skipped)})')
  new_index = np.full(n, -1, np.int64)
  new_index[good] = np.arange(len(good))
  text_to_image = new_index[np.asarray(text_to_image, np.int64)]
  keep = text_to_image >= 0  # the captions of images left out go too
  mine = good[good % hosts == host]
  return {
      'image': np.stack([owned[j] for j in mine]) if hold_images else StreamedImages(
          source, prep, [owned[j][0] for j in mine], owned[mine[0]][1]),
      'image_rows': {'ids': new_index[mine].astype(np.int32), 'total': len(good), 'most': int(per_host.max())},
      'text': tokenizer.encode([t for t, k in zip(texts, keep) if k], context_length),
      'text_to_image': text_to_image[keep].astype(np.int32),
      'language': np.asarray(languages, str)[keep],
      'skipped': dict(skipped),
  }


def _by_record(source, num_images, hosts, host, skipped, bad):
  """(record index, image index, captions, record to decode or None) of a source with one image
  per record: record j is image j, read by its own host alone."""
  for j in range(min(len(source), num_images)):
    captions = _clean(source.captions(j))
    record = source[j] if j % hosts == host else None
    if not any(c for _, c in captions):
      bad[j] = 'empty_caption'  # every host sees it
    elif record is not None and records.is_skipped(record):
      bad[j] = record[records.SKIP]
    else:
      yield j, j, captions, record
      continue
    yield j, j, [], None


def _by_bytes(source, num_images, hosts, host, skipped, bad):
  """The same for image-caption pairs: every host reads every record, and records with the same
  image bytes are one image."""
  seen, n = {}, 0  # digest of the image bytes -> image index; images so far
  for i in range(len(source)):
    record = source[i]
    if records.is_skipped(record):
      skipped[record[records.SKIP]] += 1
      continue
    captions = _clean([(record.get('language') or '', record['caption'])])
    if not any(c for _, c in captions):
      skipped['empty_caption'] += 1
      continue
    image = _vision(record)
    key = hashlib.sha1(image).digest() if isinstance(image, bytes) else None
    if key in seen:  # decoded already, by its host
      yield i, seen[key], captions, None
      continue
    if n == num_images:
      return
    j, n = n, n + 1
    if key is not None:
      seen[key] = j
    yield i, j, captions, record if j % hosts == host else None


def _clean(captions):
  return [(lang or '', ' '.join(str(c).split())) for lang, c in captions]


def _vision(record):
  return record['image'] if 'image' in record else record['video']  # a clip: [T,S,S,3]


class StreamedImages:
  """A host's eval images, not held: `x[a:b]` (or an index array) reads and decodes those rows
  from the source, uint8 [n, S, S, 3] as eval_arrays would hold them."""

  dtype = np.dtype(np.uint8)

  def __init__(self, source, prep: Preprocess, record_ids, pixel_shape):
    self.source, self.prep = source, prep
    self.record_ids, self.pixel_shape = np.asarray(record_ids, np.int64), tuple(pixel_shape)

  def __len__(self):
    return len(self.record_ids)

  @property
  def shape(self):
    return (len(self), *self.pixel_shape)

  def __getitem__(self, index) -> np.ndarray:
    ids = np.atleast_1d(self.record_ids[index])
    out = np.zeros((len(ids), *self.pixel_shape), np.uint8)
    for k, i in enumerate(ids):
      out[k] = self.prep.pixels(_vision(self.source[int(i)]), None)  # good when scanned: decodes again
    return out if np.ndim(self.record_ids[index]) else out[0]

