"""A TFDS dataset (COCO captions, ...) as a random-access source of records.

The dataset must already be prepared in the ArrayRecord file format
(`tfds build NAME --file_format=array_record`, once, anywhere): reading it then
needs neither TensorFlow nor the dataset's builder code, and Grain can read any
index, so a TFDS dataset shuffles and resumes like vlp's own ArrayRecord files.

Images come out as the encoded file stored in the dataset (TFDS keeps the JPEG
or PNG bytes and only decodes on read; decoding is skipped here), because the
pipeline decodes and random-crops at the model's size itself: decoded arrays
would pass through it uncropped, and decoding twice wastes the input workers.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from vlp.data import records


class TfdsSource(grain.sources.RandomAccessDataSource):
  """Records of one split of a prepared TFDS dataset.

  image_key and caption_key are '/'-separated paths into nested features
  ('captions/text' is the 'text' field of the 'captions' sequence); a feature
  name may itself contain '/' (COCO's 'image/id'). When the caption path leads
  to several captions, a record has the first and `captions(i)` all of them.
  language is the code given to every caption ('' when None). A record's meta
  has the example's top-level scalar features (COCO's 'image/id' and
  'image/filename'): TFDS shuffles examples when it writes them, so these,
  not the index, say which example a record is.
  """

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               image_key: str = 'image', caption_key: str = 'captions/text',
               language: str | None = None):
    self.name, self.split, self.language = name, split, language or ''
    builder = _builder(name, data_dir)
    features = builder.info.features
    self._image_keys = _image_path(features, image_key)
    self._caption_keys = _caption_path(features, caption_key)
    self._meta_keys = [k for k, f in features.items() if _is_scalar(f) and k != caption_key]
    try:
      self._data = builder.as_data_source(
          split=split, decoders=_skip_decoding(self._image_keys))
    except NotImplementedError as e:  # prepared as TFRecord: no random access
      raise ValueError(f'TFDS dataset {name!r}: {e}') from None

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict[str, Any]:
    key = f'{self.name}/{self.split}/{index}'
    example = self._data[index]
    try:
      captions = self._captions_of(example)
    except UnicodeDecodeError:
      return records.skipped(key, 'caption_not_utf8')
    if not captions:
      return records.skipped(key, 'empty_caption')
    image = _get(example, self._image_keys)
    meta = {k: _json_value(example[k]) for k in self._meta_keys}
    return records.make(key, image, captions[0], self.language, meta=meta)

  def captions(self, index: int) -> list[tuple[str, str]]:
    """(language, caption) of every caption of example `index` (for eval)."""
    return [(self.language, c) for c in self._captions_of(self._data[index])]

  def _captions_of(self, example: dict[str, Any]) -> list[str]:
    value = _get(example, self._caption_keys)
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    return [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in values]

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)'


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The builder of the prepared files, never of the dataset's code.

  tfds.builder / tfds.data_source fall back to the builder code when the files
  are missing, and the code of many datasets (coco_captions) imports
  TensorFlow: a missing dataset would surface as a missing TensorFlow.
  """
  try:
    return tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'TFDS dataset {name!r} is not prepared under data_dir={data_dir!r} '
        f'(prepare it with `tfds build {name} --file_format=array_record`; '
        f'give the config as NAME/CONFIG if it has several): {e}') from None


def _resolve(features: tfds.features.FeaturesDict, path: str, what: str):
  """Feature names along `path`, the leaf feature, and whether a Sequence is crossed.

  At each level the longest name that matches wins, so that 'image/id' is
  COCO's feature of that name rather than an 'id' inside 'image'.
  """
  parts, keys, feature, in_sequence = path.split('/'), [], features, False
  while parts:
    if isinstance(feature, tfds.features.Sequence):
      feature, in_sequence = feature.feature, True
    names = list(feature.keys()) if isinstance(feature, tfds.features.FeaturesDict) else []
    n = next((n for n in range(len(parts), 0, -1) if '/'.join(parts[:n]) in names), 0)
    if not n:
      where = '/'.join(keys) or 'the top level'
      raise ValueError(f'{what}={path!r}: no feature {parts[0]!r} at {where}; '
                       f'available there: {sorted(names)}')
    keys.append('/'.join(parts[:n]))
    feature, parts = feature[keys[-1]], parts[n:]
  if isinstance(feature, tfds.features.Sequence):
    feature, in_sequence = feature.feature, True
  return keys, feature, in_sequence


def _image_path(features, image_key: str) -> list[str]:
  keys, feature, in_sequence = _resolve(features, image_key, 'image_key')
  if in_sequence or not isinstance(feature, tfds.features.Image):
    raise ValueError(f'image_key={image_key!r} is {feature!r}'
                     f'{" in a Sequence" if in_sequence else ""}, not one Image feature')
  return keys


def _caption_path(features, caption_key: str) -> list[str]:
  keys, feature, _ = _resolve(features, caption_key, 'caption_key')
  if not isinstance(feature, tfds.features.Tensor) or np.dtype(feature.np_dtype).kind not in 'OSU':
    raise ValueError(f'caption_key={caption_key!r} is {feature!r}, not a text feature')
  return keys


def _is_scalar(feature) -> bool:
  return (isinstance(feature, tfds.features.Tensor) and not feature.shape
          and np.dtype(feature.np_dtype).kind in 'biufOSU')


def _json_value(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  return value.item() if isinstance(value, np.generic) else value


def _skip_decoding(keys: list[str]) -> dict[str, Any]:
  """Nested decoders that leave the image at `keys` as its encoded bytes."""
  decoders: Any = tfds.decode.SkipDecoding()
  for key in reversed(keys):
    decoders = {key: decoders}
  return decoders


def _get(example: dict[str, Any], keys: list[str]) -> Any:
  # A Sequence of dicts decodes to a dict of lists, so plain indexing follows
  # the path through it.
  for key in keys:
    example = example[key]
  return example


def labelled(name: str, split: str, data_dir: str | None, image_key: str, label_key: str, limit: int = 0):
  """(encoded images, labels, class names) of a prepared TFDS dataset with a ClassLabel feature:
  up to `limit` examples spread evenly over the split (0: all)."""
  from vlp.data import folder
  builder = _builder(name, data_dir)
  label = builder.info.features[label_key]
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'{name}: feature {label_key!r} is {label!r}, not a ClassLabel')
  source = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
  rows = [source[int(i)] for i in folder.spread(len(source), limit)]
  return [r[image_key] for r in rows], np.asarray([r[label_key] for r in rows]), list(label.names)
