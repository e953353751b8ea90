"""The pixel convention every part of vlp shares: images enter the models as float32 in
[-1, 1] (pixel / 127.5 - 1, big_vision's `value_range(-1, 1)`), not with ImageNet/CLIP
mean-std: it needs no dataset statistics and treats every source alike.

The input pipeline hands out uint8 pixels and the models normalise them on the device
(`model_input`): a quarter of float32's bytes from host to device, and in an eval set
held in host memory.
"""
import numpy as np

PIXEL_CENTER = 127.5  # uint8 pixel mapped to 0.
PIXEL_SCALE = 127.5  # uint8 pixels per unit: 0 -> -1, 255 -> 1.


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 in [-1, 1]; a numpy or a jax array (traced too)."""
  if image.dtype != np.uint8:
    raise TypeError(f'expected uint8 pixels, got {image.dtype}')
  return (image.astype(np.float32) - PIXEL_CENTER) / PIXEL_SCALE


def model_input(x):
  """An input as the model takes it, inside a compiled function: uint8 pixels (images,
  clips) -> float32 in [-1, 1]; anything else (tokens, labels, floats) unchanged."""
  return normalize_image(x) if x.dtype == np.uint8 else x
