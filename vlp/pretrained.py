"""Exported encoders for Python users: `vlp.load_pretrained(PATH)`.

Runs the jax.export'ed StableHLO of `vlp export` with its safetensors
weights: it needs jax, numpy, safetensors and the SentencePiece tokenizer,
not vlp's model code (nor flax), so a checkpoint keeps working when the model
code changes.
"""
import json

import jax
import numpy as np

from vlp.core import paths, weights_files
from vlp.core.pixels import normalize_image
from vlp.data import hub_tokenizer


class Encoders:
  """encode_image(images) / encode_text(texts or tokens) -> L2-normalised [B, D] float32;
  an IMP export also has encode_video(clips). A text encoder alone (a BERT import) has
  encode_text only, which gives its last hidden states, float32 [B, L, width].

  Images are uint8 [B, S, S, 3] pixels, or floats normalised as the model
  takes them ([-1, 1], or an import's mean and std: `preprocess` makes them
  from image files); clips [B, T, S, S, 3] likewise; texts are strings,
  tokenized to `context_length`, or int token ids.
  """

  def __init__(self, path: str):
    from vlp.data.tokenizer import Tokenizer
    with paths.open(paths.join(path, 'config.json')) as f:  # local or remote (gs://)
      self.config = json.load(f)
    if 'text_encoder' not in self.config:
      raise ValueError(f'{path} has no exported encoders: export it again with this version of `vlp export`')
    flat = weights_files.read(path)
    self.weights = [jax.device_put(flat[k]) for k in self.config['param_keys']]
    self._image, self._text, self._video = (
        self._load(paths.join(path, self.config[f'{kind}_encoder'])) if f'{kind}_encoder' in self.config else None
        for kind in ('image', 'text', 'video'))
    # vlp's own SentencePiece model; an import carries its source's tokenizer.json or spiece.model
    tokenizer = paths.join(path, 'tokenizer.model')
    self.tokenizer = (Tokenizer(tokenizer) if paths.exists(tokenizer)
                      else hub_tokenizer.for_export(path, self.config.get('tokens') or {}))
    # an import's pixels as its source was trained on: (x / 255 - mean) / std; vlp's own: [-1, 1]
    self.normalization = self.config.get('preprocess')
    model = self.config['model']
    self.image_size = model['image']['image_size'] if 'image' in model else None
    self.context_length = model['text']['context_length']

  @staticmethod
  def _load(file):
    exported = jax.export.deserialize(bytearray(paths.read_bytes(file)))
    return jax.jit(exported.call)

  def preprocess(self, images) -> np.ndarray:
    """Encoded image files (bytes) or uint8 arrays -> float32 [B, S, S, 3], resized and
    centre-cropped as in evaluation, normalised by the export's mean and std."""
    from vlp.data import transforms
    return self.normalize(np.stack([x if isinstance(x, np.ndarray) else transforms.resize_center_crop(
        x, self.image_size) for x in images]))

  def normalize(self, pixels) -> np.ndarray:
    """uint8 pixels (images or clips) -> float32 as the model takes them: the export's mean and std
    (an import's), or [-1, 1]."""
    pixels = np.asarray(pixels)
    if self.normalization is None:
      return normalize_image(pixels)
    if pixels.dtype != np.uint8:
      raise TypeError(f'expected uint8 pixels, got {pixels.dtype}')
    mean, std = (np.asarray(self.normalization[k], np.float32) for k in ('mean', 'std'))
    return (pixels.astype(np.float32) / 255.0 - mean) / std

  def tokenize(self, texts) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError('this export has no tokenizer (an import of a source without tokenizer.json or '
                       'spiece.model keeps its source\'s token ids): give encode_text int token ids [B, L]')
    return self.tokenizer.encode(list(texts), self.context_length)

  def encode_image(self, images) -> np.ndarray:
    if self._image is None:
      raise ValueError(f"a {self.config['model']['name']} export is a text encoder: it has no image encoder")
    return _writable(self._image(self.weights, self._float(images)))

  def _float(self, x):
    """uint8 pixels are normalised (`normalize`), floats taken as normalised already."""
    x = np.asarray(x)
    return self.normalize(x) if x.dtype == np.uint8 else x.astype(np.float32)

  def encode_video(self, clips) -> np.ndarray:
    if self._video is None:
      raise ValueError(f"a {self.config['model']['name']} export has no video encoder (IMP's has)")
    return _writable(self._video(self.weights, self._float(clips)))

  def encode_text(self, texts) -> np.ndarray:
    tokens = texts if isinstance(texts, np.ndarray) and texts.dtype.kind == 'i' else self.tokenize(texts)
    return _writable(self._text(self.weights, np.asarray(tokens, np.int32)))


def _writable(x) -> np.ndarray:
  """A jax array as a numpy array the caller owns (np.asarray would be a read-only view of it)."""
  return np.array(x)


def load(path: str) -> Encoders:
  return Encoders(path)
