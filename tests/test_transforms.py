"""Image and text transforms, checked against direct computations.

The crops are compared with plain Pillow on the fully decoded upright image
(what the transforms compute with fewer steps), the modes with pixels worked
out by hand, the random draws with binomial bounds of 5 standard deviations
(a false failure once in millions of runs).
"""
import io
import math
import pickle
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps
import pytest

from vlp.data import transforms

BILINEAR = Image.Resampling.BILINEAR


def _encode(pixels: np.ndarray | Image.Image, fmt: str, **kwargs) -> bytes:
  img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  out = io.BytesIO()
  img.save(out, fmt, **kwargs)
  return out.getvalue()


def _png(width: int, height: int, bit_depth: int, colour_type: int,
         samples: np.ndarray | None = None) -> bytes:
  """A PNG written byte by byte: 16-bit samples, or a header with no pixels."""
  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  header = struct.pack('>IIBBBBB', width, height, bit_depth, colour_type, 0, 0, 0)
  data = b''
  if samples is not None:  # Every row starts with filter type 0 (none).
    rows = samples.astype('>u2').reshape(height, -1).view(np.uint8)
    data = zlib.compress(np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes())
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', data) + chunk(b'IEND', b'')


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _photo(height: int, width: int) -> np.ndarray:
  """Smooth shading under waves of 3 to 17 cycles per image, and some noise."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  waves = sum(12 * np.sin(2 * np.pi * f * (x + 0.7 * y) + f) for f in (3, 7, 11, 17))
  cross = sum(12 * np.sin(2 * np.pi * f * (0.6 * x - y) + f) for f in (5, 13))
  noise = np.random.default_rng(0).normal(0, 6, (height, width))
  channels = [110 + 90 * x + waves, 140 - 80 * y + cross + noise,
              90 + 60 * x * y - waves + cross]
  return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _with_orientation(pixels: np.ndarray, orientation: int, **kwargs) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _encode(pixels, 'JPEG', exif=exif.tobytes(), quality=95, **kwargs)


def _upright(data: bytes) -> Image.Image:
  """Full decode, turned upright by Pillow's own EXIF handling."""
  return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert('RGB')


def _reason(fn, *args, **kwargs) -> str:
  with pytest.raises(transforms.BadImage) as e:
    fn(*args, **kwargs)
  return e.value.reason


def _diff(a, b) -> np.ndarray:
  return np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))


def _crop_fns(size=32):
  return [transforms.decode_image,
          lambda d: transforms.random_resized_crop(d, size, np.random.default_rng(0)),
          lambda d: transforms.resize_center_crop(d, size)]


# --- Decoding ----------------------------------------------------------------

def test_png_decodes_to_the_pixels_written():
  pixels = _noise(37, 53)
  out = transforms.decode_image(_encode(pixels, 'PNG'))
  assert out.dtype == np.uint8 and out.flags.writeable
  np.testing.assert_array_equal(out, pixels)


def test_lossless_webp_and_first_gif_frame():
  pixels = _noise(20, 30)
  np.testing.assert_array_equal(
      transforms.decode_image(_encode(pixels, 'WEBP', lossless=True)), pixels)
  frames = [Image.new('RGB', (16, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
  gif = _encode(frames[0], 'GIF', save_all=True, append_images=frames[1:])
  assert Image.open(io.BytesIO(gif)).n_frames == 2
  np.testing.assert_array_equal(transforms.decode_image(gif), np.asarray(frames[0]))


@pytest.mark.parametrize('fn', _crop_fns())
def test_truncated_jpeg_is_corrupt(fn):
  data = _encode(_photo(512, 512), 'JPEG', quality=90)
  assert _reason(fn, data[:len(data) // 2]) == 'corrupt_image'


@pytest.mark.parametrize('data', [b'', b'not an image' * 50, b'\x89PNG\r\n\x1a\n' + bytes(200),
                                  b'\xff\xd8\xff\xe0' + bytes(500)])
def test_garbage_is_corrupt(data):
  assert _reason(transforms.decode_image, data) == 'corrupt_image'


def test_unsupported_format_is_corrupt():
  data = _encode(_noise(16, 16), 'PPM')
  assert _reason(transforms.decode_image, data) == 'corrupt_image'


@pytest.mark.parametrize('fn', _crop_fns())
def test_decompression_bombs_are_refused_from_the_header(fn):
  # No pixel data follows the headers: had anything been decoded, the reason
  # would be 'corrupt_image'. Decoded, the first would take 1.2 GB: it is
  # past twice Pillow's own limit, whose error is mapped; the second is
  # below Pillow's limit and refused by max_pixels (64M by default).
  assert _reason(fn, _png(20_000, 20_000, 8, 2)) == 'decompression_bomb'
  assert _reason(fn, _png(9_000, 9_000, 8, 2)) == 'decompression_bomb'
  data = _encode(_noise(100, 100), 'PNG')
  assert _reason(transforms.decode_image, data, max_pixels=9_999) == 'decompression_bomb'
  assert transforms.decode_image(data, max_pixels=10_000).shape == (100, 100, 3)


def test_too_small():
  data = _encode(_noise(100, 7), 'PNG')
  assert _reason(transforms.decode_image, data) == 'too_small'
  assert _reason(transforms.random_resized_crop, data, 8, np.random.default_rng(0)) == 'too_small'
  assert transforms.decode_image(data, min_side=7).shape == (100, 7, 3)


def test_bad_image_pickles_with_its_reason():
  e = pickle.loads(pickle.dumps(transforms.BadImage('too_small', '3x4')))
  assert (e.reason, e.detail, str(e)) == ('too_small', '3x4', 'too_small: 3x4')


# --- Modes -------------------------------------------------------------------

def test_greyscale_becomes_equal_channels():
  grey = _noise(24, 24)[..., 0]
  out = transforms.decode_image(_encode(grey, 'PNG'))
  np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, -1))


def _on_white(rgb, alpha):
  a = alpha[..., None].astype(np.float64) / 255
  return rgb * a + 255 * (1 - a)


@pytest.mark.parametrize('mode', ['RGBA', 'LA'])
def test_alpha_is_composited_on_white(mode):
  pixels = _noise(20, 20, seed=1)
  alpha = np.tile(np.linspace(0, 255, 20).astype(np.uint8), (20, 1))
  colour = pixels if mode == 'RGBA' else np.repeat(pixels[..., :1], 3, -1)
  stacked = np.dstack([colour if mode == 'RGBA' else colour[..., :1], alpha])
  out = transforms.decode_image(_encode(Image.fromarray(stacked, mode), 'PNG'))
  assert _diff(out, _on_white(colour, alpha)).max() <= 1
  np.testing.assert_array_equal(out[:, 0], 255)  # Fully transparent.
  np.testing.assert_array_equal(out[:, -1], colour[:, -1])  # Opaque.


def test_palette_with_transparency():
  index = np.random.default_rng(2).integers(0, 4, (16, 16), dtype=np.uint8)
  palette = [(0, 0, 0), (200, 10, 10), (10, 200, 10), (10, 10, 200)]
  img = Image.fromarray(index, 'P')
  img.putpalette([v for c in palette for v in c])
  out = transforms.decode_image(_encode(img, 'PNG', transparency=0))
  expected = np.array([(255, 255, 255)] + palette[1:], np.uint8)[index]
  np.testing.assert_array_equal(out, expected)


def test_cmyk_jpeg():
  cmyk = np.zeros((32, 32, 4), np.uint8)
  cmyk[:, :16] = (0, 255, 255, 0)  # Red: no cyan, full magenta and yellow.
  cmyk[:, 16:] = (255, 255, 0, 0)  # Blue.
  data = _encode(Image.fromarray(cmyk, 'CMYK'), 'JPEG', quality=95)
  assert Image.open(io.BytesIO(data)).mode == 'CMYK'
  out = transforms.decode_image(data)
  assert _diff(out[4:-4, 2:12], (255, 0, 0)).max() <= 4
  assert _diff(out[4:-4, 20:30], (0, 0, 255)).max() <= 4


def test_16_bit_png():
  levels = np.arange(256) * 257  # k * 257 is k in 8 bits exactly.
  grey = np.concatenate([levels, [32768, 65535, 1, 128]]).reshape(20, 13)
  out = transforms.decode_image(_png(13, 20, 16, 0, grey))
  expected = np.concatenate([np.arange(256), [128, 255, 0, 0]]).reshape(20, 13)
  np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))
  rgb = np.random.default_rng(3).integers(0, 256, (10, 12, 3)) * 257
  np.testing.assert_array_equal(transforms.decode_image(_png(12, 10, 16, 2, rgb)), rgb // 257)


# --- EXIF orientation --------------------------------------------------------

def _quadrants(height=40, width=64) -> np.ndarray:
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:height // 2, :width // 2] = (255, 0, 0)
  pixels[:height // 2, width // 2:] = (0, 255, 0)
  pixels[height // 2:, :width // 2] = (0, 0, 255)
  pixels[height // 2:, width // 2:] = (255, 255, 255)
  return pixels


def test_exif_rotation_by_colour_positions():
  # Orientation 6: the stored image must turn 90 degrees clockwise to be
  # upright, so its top-left (red) ends top-right and it stands 64 high.
  out = transforms.decode_image(_with_orientation(_quadrants(), 6))
  assert out.shape == (64, 40, 3)
  corners = {'top-left': out[8, 8], 'top-right': out[8, -8],
             'bottom-left': out[-8, 8], 'bottom-right': out[-8, -8]}
  expected = {'top-left': (0, 0, 255), 'top-right': (255, 0, 0),
              'bottom-left': (255, 255, 255), 'bottom-right': (0, 255, 0)}
  for corner, colour in expected.items():
    assert _diff(corners[corner], colour).max() <= 8, corner


@pytest.mark.parametrize('orientation', range(1, 9))
def test_every_orientation_matches_pillow(orientation):
  data = _with_orientation(_photo(48, 80), orientation)
  upright = _upright(data)
  np.testing.assert_array_equal(transforms.decode_image(data), np.asarray(upright))
  # Small enough that nothing is draft-decoded: only the orientation and the
  # order of the resize's two passes (each rounds to uint8) differ.
  width, height = upright.size
  box = transforms.sample_crop_box(width, height, np.random.default_rng(5))
  crop = transforms.random_resized_crop(data, 32, np.random.default_rng(5))
  assert _diff(crop, upright.resize((32, 32), BILINEAR, box=box)).max() <= 2
  centre = transforms.resize_center_crop(data, 32)
  assert _diff(centre, _naive_center_crop(upright, 32)).max() <= 2


# --- Crops -------------------------------------------------------------------

def test_sample_crop_box_statistics():
  # On a square image every draw of this scale and ratio fits, so the first
  # is taken: area fractions are uniform and log ratios uniform, symmetric.
  rng, n, side = np.random.default_rng(0), 20_000, 1000
  boxes = np.array([transforms.sample_crop_box(side, side, rng, (0.1, 0.5)) for _ in range(n)])
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= side).all() and (w > 0).all()
  area = w * h / side**2
  assert area.min() >= 0.1 - 2e-3 and area.max() <= 0.5 + 2e-3  # w, h are rounded
  log_ratio = np.log(w / h)
  assert np.abs(log_ratio).max() <= math.log(4 / 3) + 3e-3
  se_area, se_ratio = 0.4 / math.sqrt(12 * n), 2 * math.log(4 / 3) / math.sqrt(12 * n)
  assert abs(area.mean() - 0.3) < 5 * se_area + 1e-3
  assert abs(log_ratio.mean()) < 5 * se_ratio + 1e-3
  assert abs((area < 0.3).mean() - 0.5) < 5 * 0.5 / math.sqrt(n)
  # Placement: the left edge is uniform over the room the crop leaves.
  room = boxes[:, 0] / np.maximum(side - w, 1)
  assert abs(room.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n) + 1e-3


def test_sample_crop_box_on_a_wide_image_stays_in_range():
  rng = np.random.default_rng(1)
  for _ in range(2000):
    left, top, right, bottom = transforms.sample_crop_box(300, 200, rng)
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
    assert 0.5 - 0.01 <= w * h / 60_000 <= 1
    assert 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01


@pytest.mark.parametrize('width, height, scale, expected', [
    (100, 1000, (0.9, 1.0), (0, 433, 100, 566)),  # 100 / (3/4) = 133 high.
    (1000, 100, (0.9, 1.0), (433, 0, 566, 100)),  # 100 * 4/3 = 133 wide.
    (90, 100, (1.5, 2.0), (0, 0, 90, 100)),  # Ratio in range: the whole image.
])
def test_sample_crop_box_falls_back_to_the_clamped_centre(width, height, scale, expected):
  box = transforms.sample_crop_box(width, height, np.random.default_rng(0), scale)
  assert box == expected


def test_random_resized_crop_shape_and_determinism():
  data = _encode(_photo(120, 160), 'JPEG')
  crops = [transforms.random_resized_crop(data, 32, np.random.default_rng(seed))
           for seed in (7, 7, 8)]
  assert crops[0].shape == (32, 32, 3) and crops[0].dtype == np.uint8
  np.testing.assert_array_equal(crops[0], crops[1])
  assert not np.array_equal(crops[0], crops[2])


def test_random_resized_crop_of_a_png_is_pillow_crop_then_resize():
  data = _encode(_noise(150, 200, seed=4), 'PNG')
  full = Image.open(io.BytesIO(data)).convert('RGB')
  for seed in range(10):
    out = transforms.random_resized_crop(data, 32, np.random.default_rng(seed))
    box = transforms.sample_crop_box(200, 150, np.random.default_rng(seed))
    naive = np.asarray(full.crop(box).resize((32, 32), BILINEAR))
    # The filter of the outermost rows and columns also reads the pixels
    # just outside the box (a crop() would cut them off); inside, the same
    # filter weights: equal up to their float rounding.
    assert _diff(out[1:-1, 1:-1], naive[1:-1, 1:-1]).max() <= 1


def _spy_reduction(monkeypatch) -> list[int]:
  used = []
  draft = transforms._draft

  def spy(*args):
    used.append(draft(*args))
    return used[-1]
  monkeypatch.setattr(transforms, '_draft', spy)
  return used


# Draft decoding low-passes in the DCT domain, not with the bilinear filter:
# on _photo the outputs differ by ~0.5 level on average (measured 0.2-0.55).
# The same crop with its box moved by 2 source pixels (a quarter of an output
# pixel) differs by ~1.4, so the bound also catches a misplaced box.
DRAFT_MEAN_ABS_DIFF = 1.0


@pytest.mark.parametrize('orientation', range(1, 9))
def test_draft_decoding_is_close_to_the_full_decode(monkeypatch, orientation):
  data = _with_orientation(_photo(600, 1000), orientation)
  upright = _upright(data)
  used = _spy_reduction(monkeypatch)
  for seed in range(6):
    out = transforms.random_resized_crop(data, 64, np.random.default_rng(seed))
    box = transforms.sample_crop_box(*upright.size, np.random.default_rng(seed))
    naive = upright.resize((64, 64), BILINEAR, box=box)
    assert _diff(out, naive).mean() < DRAFT_MEAN_ABS_DIFF
  assert min(used) >= 4  # Crops >= 0.5 of 600 x 1000 -> >= 4 x 64 per side.
  out = transforms.resize_center_crop(data, 64)
  assert used[-1] == 8
  assert _diff(out, _naive_center_crop(upright, 64)).mean() < DRAFT_MEAN_ABS_DIFF


def test_no_draft_when_the_crop_is_too_small(monkeypatch):
  data = _encode(_photo(100, 100), 'JPEG')
  used = _spy_reduction(monkeypatch)
  transforms.random_resized_crop(data, 64, np.random.default_rng(0))
  transforms.resize_center_crop(data, 64)
  assert used == [1, 1]


def _naive_center_crop(img: Image.Image, size: int) -> np.ndarray:
  w, h = img.size
  short = min(w, h)
  resized = img.resize((round(w * size / short), round(h * size / short)), BILINEAR)
  left, top = (resized.width - size) // 2, (resized.height - size) // 2
  return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize('height, width', [(200, 300), (333, 250), (64, 64), (50, 90)])
def test_resize_center_crop_is_resize_then_crop(height, width):
  data = _encode(_noise(height, width, seed=5), 'PNG')
  out = transforms.resize_center_crop(data, 48)
  naive = _naive_center_crop(Image.open(io.BytesIO(data)).convert('RGB'), 48)
  assert out.shape == (48, 48, 3)
  assert _diff(out, naive).max() <= 1


def test_flip_left_right():
  image = _noise(4, 5)
  np.testing.assert_array_equal(
      transforms.flip_left_right(image, np.random.default_rng(0), p=1.0), image[:, ::-1])
  assert transforms.flip_left_right(image, np.random.default_rng(0), p=0.0) is image
  rng, n = np.random.default_rng(1), 4000
  flips = sum(transforms.flip_left_right(image, rng) is not image for _ in range(n))
  assert abs(flips - n / 2) < 5 * math.sqrt(n / 4)
