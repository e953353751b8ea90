"""Pure-numpy per-example transforms of the input pipeline: decoding and cropping to uint8
pixels, which the models normalise on the device (vlp.core.pixels).

Encoded images (web data: JPEG, PNG, WebP, GIF...) are decoded with Pillow.
A file that cannot become an example raises BadImage, whose `reason` the
pipeline counts as a metric instead of failing the job. The crops decode
JPEGs at reduced scale where the crop allows it: most of the time of a
training crop is libjpeg's, and 1/2 to 1/8 scale decoding cuts it by 2-10x.
"""
import contextlib
import io
import math
import struct

import numpy as np
from PIL import ExifTags, Image

# Larger images are refused from their header, before any pixel is decoded:
# 64M pixels is a 192 MB RGB array, past any photo a caption dataset needs.
MAX_PIXELS = 64_000_000
MIN_SIDE = 8  # Smaller images are icons or tracking pixels, not photos.

# Pillow plugins that are tried; the others (EPS calls Ghostscript, and many
# are rare or unsafe) make an image 'corrupt_image' like any unreadable file.
# A JPEG with several pictures (a camera's MPO) opens as JPEG too.
_FORMATS = ('JPEG', 'PNG', 'WEBP', 'GIF', 'BMP', 'TIFF')
# What Pillow's parsers and decoders raise on malformed input.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError,
                  struct.error)
# EXIF orientation -> the transposition that shows the image upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE = (255, 255, 255, 255)


class BadImage(ValueError):
  """An encoded image that cannot become an example.

  `reason` is a short snake_case id that becomes a metric name:
  'corrupt_image' (unreadable, truncated or unsupported), 'decompression_bomb'
  (more pixels than allowed) or 'too_small' (a side below the minimum).
  """

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(reason, detail)  # Both in args, so it pickles back whole.
    self.reason, self.detail = reason, detail

  def __str__(self):
    return f'{self.reason}: {self.detail}' if self.detail else self.reason


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS,
                 min_side: int = MIN_SIDE) -> np.ndarray:
  """uint8 [H, W, 3] RGB pixels of an encoded image, shown upright.

  Every pixel is decoded, so a truncated file raises BadImage('corrupt_image')
  rather than coming back half grey. Animated GIF/WebP give their first
  frame. See _to_rgb for how other modes become RGB.
  """
  with _decoding():
    img = _open(data, max_pixels, min_side)
    method = _UPRIGHT.get(_orientation(img))
    img.load()
    img = _to_rgb(img)
    return np.array(img.transpose(method) if method is not None else img)


def sample_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: tuple[float, float] = (0.5, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 10) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of an Inception-style random crop.

  The crop covers a uniform fraction of the area in `scale` with a
  log-uniform aspect ratio (width / height) in `ratio`; the first of
  `attempts` draws that fits in the image is placed uniformly. When none
  fits, the central crop with the image's ratio clamped to `ratio` is used.
  Every number is drawn at once, so rng advances by the same amount each
  call, and the arithmetic is scalar Python: numpy's per-call overhead on
  ten-element arrays would cost more than the whole loop.
  """
  draws = rng.random(2 * attempts + 2).tolist()
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for a, r in zip(draws[0:2 * attempts:2], draws[1:2 * attempts:2]):
    area = width * height * (scale[0] + (scale[1] - scale[0]) * a)
    aspect = math.exp(log_lo + (log_hi - log_lo) * r)
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      # floor(u * n) of a uniform u in [0, 1) is uniform over 0..n-1.
      left = int(draws[-2] * (width - w + 1))
      top = int(draws[-1] * (height - h + 1))
      return left, top, left + w, top + h
  w, h = _central_size(width, height, ratio)
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def random_resized_crop(data: bytes, size: int, rng: np.random.Generator, *,
                        scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        max_pixels: int = MAX_PIXELS,
                        min_side: int = MIN_SIDE) -> np.ndarray:
  """uint8 [size, size, 3]: a sample_crop_box crop resized with bilinear.

  The box is drawn in upright coordinates. The resize is antialiased (the
  filter widens with the reduction) and, taking the crop box as a region of
  the whole image, reads the pixels just outside the box that its filter
  reaches: the result is the crop of the image as if it were resized whole,
  and differs from crop() then resize() in the outermost output rows and
  columns only. JPEGs may be decoded at reduced scale, see _crop_resize.
  """
  def box(width, height):
    return sample_crop_box(width, height, rng, scale, ratio)
  return _crop_resize(data, size, box, max_pixels, min_side)


def resize_center_crop(data: bytes, size: int, *, max_pixels: int = MAX_PIXELS,
                       min_side: int = MIN_SIDE) -> np.ndarray:
  """uint8 [size, size, 3]: the evaluation view of an encoded image.

  The image, upright, is resized with bilinear (antialiased) so that its
  short side is `size` and the long side round(long * size / short), then the
  centre size x size is kept (offset (long' - size) // 2). Only that centre is
  computed, from the decoded image directly; JPEGs may be decoded at reduced
  scale, see _crop_resize.
  """
  def box(width, height):
    resized = _short_side_resized(width, height, size)
    left, top = ((r - size) // 2 for r in resized)
    sx, sy = width / resized[0], height / resized[1]
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy
  return _crop_resize(data, size, box, max_pixels, min_side)


def flip_left_right(image: np.ndarray, rng: np.random.Generator,
                    p: float = 0.5) -> np.ndarray:
  """image [..., H, W, C] mirrored with probability p (a view, not a copy).

  One number is drawn whether or not it flips, so the draws that follow do
  not depend on the outcome.
  """
  return image[..., ::-1, :] if rng.random() < p else image


@contextlib.contextmanager
def _decoding():
  """Turns what Pillow raises on a bad file into BadImage.

  Pillow's own pixel limit (Image.MAX_IMAGE_PIXELS, left as it is) is a
  second bound behind max_pixels: past twice it Image.open raises
  DecompressionBombError, and its warning is an exception where warnings are
  made errors.
  """
  try:
    yield
  except BadImage:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadImage('decompression_bomb', str(e)) from e
  except _DECODE_ERRORS as e:
    raise BadImage('corrupt_image', f'{type(e).__name__}: {e}') from e


def _open(data: bytes, max_pixels: int, min_side: int) -> Image.Image:
  """The image with only its header read, its size checked.

  No pixel is decoded here, so a bomb is refused before it allocates
  anything. Truncation is caught later, by load(): Pillow only accepts a
  truncated file when ImageFile.LOAD_TRUNCATED_IMAGES is set, which vlp
  never does.
  """
  img = Image.open(io.BytesIO(data), formats=_FORMATS)
  width, height = img.size
  if width * height > max_pixels:
    raise BadImage('decompression_bomb', f'{width}x{height} > {max_pixels} pixels')
  if min(width, height) < min_side:
    raise BadImage('too_small', f'{width}x{height}, a side < {min_side}')
  return img


def _orientation(img: Image.Image) -> int:
  """EXIF orientation, 1 (upright) when missing or invalid.

  A JPEG's EXIF precedes its pixels, so this reads no pixel; Pillow decodes
  a PNG here, as its EXIF may follow them.
  """
  value = img.getexif().get(ExifTags.Base.Orientation, 1)
  return value if value in _UPRIGHT else 1


def _to_rgb(img: Image.Image) -> Image.Image:
  """The decoded image in mode RGB.

  Transparent pixels are composited on white, the background most web
  images with alpha (logos, product shots, icons) were made to be seen on;
  on black their dark lines and text would vanish. 16-bit greyscale is scaled
  to 8 bits (Pillow's convert would clip everything above 255 to white).
  CMYK, palette and other modes use Pillow's conversion.
  """
  if img.mode == 'RGB':
    return img
  if img.mode.startswith('I'):
    return Image.fromarray(_to_uint8(np.asarray(img))).convert('RGB')
  if img.mode in ('LA', 'La', 'PA', 'RGBa') or (
      img.mode == 'P' and 'transparency' in img.info):
    img = img.convert('RGBA')
  if img.mode == 'RGBA':
    return Image.alpha_composite(Image.new('RGBA', img.size, _WHITE), img).convert('RGB')
  return img.convert('RGB')


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
  """16-bit (0..65535) greyscale -> uint8, rounded."""
  wide = np.clip(pixels, 0, 65535).astype(np.uint32)
  return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _central_size(width: int, height: int,
                  ratio: tuple[float, float]) -> tuple[int, int]:
  """The largest centred crop whose aspect ratio is clamped into `ratio`."""
  if width / height < min(ratio):
    return width, int(round(width / min(ratio)))
  if width / height > max(ratio):
    return int(round(height * max(ratio))), height
  return width, height


def _short_side_resized(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) resized so that the short side is `size`."""
  if width <= height:
    return size, max(size, round(height * size / width))
  return max(size, round(width * size / height)), size


def _crop_resize(data: bytes, size: int, box_of, max_pixels: int,
                 min_side: int) -> np.ndarray:
  """uint8 [size, size, 3] of the region box_of(upright width, height) gives.

  The region is mapped into the stored image's orientation, cut and resized
  there, and only the size x size result is turned upright: cheaper than
  turning the whole image, and the same pixels up to the rounding of the
  resize's intermediate pass.

  A JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT) when
  the region keeps at least `size` pixels per side there. The reduced decode
  low-passes each 8x8 block in the DCT domain, a slightly different filter
  from decoding whole and letting the bilinear resize do all the reduction:
  the outputs differ by a couple of levels on average (tests bound it).
  """
  with _decoding():
    img = _open(data, max_pixels, min_side)
    orientation = _orientation(img)
    width, height = img.size
    upright = (height, width) if orientation >= 5 else (width, height)
    box = _stored_box(box_of(*upright), orientation, width, height)
    reduction = _draft(img, box, size)
    img.load()
    img = _to_rgb(img)
    out = img.resize((size, size), Image.Resampling.BILINEAR,
                     box=tuple(c / reduction for c in box))
    method = _UPRIGHT.get(orientation)
    return np.array(out.transpose(method) if method is not None else out)


def _stored_box(box, orientation: int, width: int, height: int):
  """A box of the upright image in the coordinates of the stored width x height one."""
  x0, y0, x1, y1 = box
  w, h = width, height
  return {
      1: (x0, y0, x1, y1),
      2: (w - x1, y0, w - x0, y1),
      3: (w - x1, h - y1, w - x0, h - y0),
      4: (x0, h - y1, x1, h - y0),
      5: (y0, x0, y1, x1),
      6: (y0, h - x1, y1, h - x0),
      7: (w - y1, h - x1, w - y0, h - x0),
      8: (w - y1, x0, w - y0, x1),
  }[orientation]


def _draft(img: Image.Image, box, size: int) -> int:
  """Asks libjpeg for the largest reduction (1, 2, 4 or 8) that keeps the
  box at least `size` pixels per side; returns the one it will use.

  Coordinates of the reduced image are those of the full one divided by the
  reduction (each 8x8 block becomes 8/r pixels), whatever the image's size.
  """
  if img.format not in ('JPEG', 'MPO'):
    return 1
  side = min(box[2] - box[0], box[3] - box[1])
  reduction = 8
  while reduction > 1 and side < reduction * size:
    reduction //= 2
  if reduction == 1:
    return 1
  width, height = img.size
  # Pillow picks the largest power of two <= min(width // w, height // h);
  # with w = width // r that is r.
  drafted = img.draft('RGB', (width // reduction, height // reduction))
  if drafted is None:  # Not a single-scan JPEG Pillow can reduce.
    return 1
  return round(width / drafted[1][2])
