"""Pure-numpy per-example transforms of the input pipeline.

Images enter the models as float32 in [-1, 1] (pixel / 127.5 - 1, the
big_vision `value_range(-1, 1)` convention) rather than with ImageNet/CLIP
mean-std: it needs no dataset statistics and treats every source alike.
"""
import numpy as np

PIXEL_CENTER = 127.5  # uint8 pixel mapped to 0.
PIXEL_SCALE = 127.5  # uint8 pixels per unit: 0 -> -1, 255 -> 1.


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, 3] -> float32 in [-1, 1]."""
  if image.dtype != np.uint8:
    raise TypeError(f'expected uint8 pixels, got {image.dtype}')
  return (image.astype(np.float32) - PIXEL_CENTER) / PIXEL_SCALE
