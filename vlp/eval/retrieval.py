"""Zero-shot retrieval: recall@K in both directions with several captions per image.

Similarities are computed in chunks inside `jax.jit`, so memory stays
O(chunk x N) however many images and captions there are.

Ties count against the model: a wrong candidate that scores exactly as high as
the correct one is ranked before it.
"""
import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _text_ranks(text_chunk, image_emb, target):
  """For each caption: how many images score >= its own image (excluding it)."""
  sims = text_chunk @ image_emb.T
  correct = jnp.take_along_axis(sims, target[:, None], axis=1)
  return jnp.sum(sims >= correct, axis=1) - 1


@jax.jit
def _image_ranks(image_chunk, image_ids, text_emb, text_to_image):
  """For each image: how many captions of other images score >= its best caption."""
  sims = image_chunk @ text_emb.T
  positive = text_to_image[None, :] == image_ids[:, None]
  best = jnp.max(jnp.where(positive, sims, -jnp.inf), axis=1, keepdims=True)
  return jnp.sum(jnp.where(positive, False, sims >= best), axis=1)


def _pad_rows(x, n):
  return np.pad(x, [(0, n - len(x))] + [(0, 0)] * (x.ndim - 1))


def _in_chunks(fn, rows, row_ids, chunk):
  """Applies fn(rows[a:b], row_ids[a:b]) chunk by chunk; the last chunk is
  padded so that every call has the same shape (one compilation)."""
  chunk = max(1, min(chunk, len(rows)))
  out = []
  for a in range(0, len(rows), chunk):
    b = min(a + chunk, len(rows))
    out.append(np.asarray(fn(_pad_rows(rows[a:b], chunk), _pad_rows(row_ids[a:b], chunk)))[:b - a])
  return np.concatenate(out) if out else np.zeros((0,), np.int32)


def recall_at_k(image_emb, text_emb, text_to_image, ks=(1, 5, 10), chunk=1024) -> dict:
  """Recall@K in percent; keys `i2t@K` and `t2i@K`.

  `text_to_image[j]` is the image index of caption j. Image->text counts a hit
  when any caption of the image is in its top K (CLIP convention); images
  without captions are left out. Text->image averages over all captions.
  """
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_to_image = np.asarray(text_to_image, np.int32)
  n_img, n_txt = len(image_emb), len(text_emb)
  if text_to_image.shape != (n_txt,):
    raise ValueError(f'text_to_image has shape {text_to_image.shape}, expected ({n_txt},)')
  if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
    raise ValueError('text_to_image holds an index outside [0, number of images)')
  t_ranks = _in_chunks(lambda t, tgt: _text_ranks(t, image_emb, tgt), text_emb, text_to_image, chunk)
  i_ranks = _in_chunks(lambda im, ids: _image_ranks(im, ids, text_emb, text_to_image), image_emb,
                       np.arange(n_img, dtype=np.int32), chunk)
  has_caption = np.bincount(text_to_image, minlength=n_img) > 0
  i_ranks = i_ranks[has_caption]
  out = {}
  for k in ks:
    out[f'i2t@{k}'] = 100.0 * float(np.mean(i_ranks < k))
    out[f't2i@{k}'] = 100.0 * float(np.mean(t_ranks < k))
  return out


def recall_at_k_from_scores(i2t_scores, t2i_scores, text_to_image, ks=(1, 5, 10)) -> dict:
  """recall_at_k for given score matrices: i2t [images, captions], t2i [captions, images].

  For rankings that are not one dot product, such as ITC candidates re-ranked
  by an ITM head. Same conventions and keys as recall_at_k (ties count against).
  """
  i2t, t2i = np.asarray(i2t_scores, np.float32), np.asarray(t2i_scores, np.float32)
  text_to_image = np.asarray(text_to_image, np.int32)
  n_img, n_txt = i2t.shape
  if t2i.shape != (n_txt, n_img) or text_to_image.shape != (n_txt,):
    raise ValueError(f'shapes i2t {i2t.shape}, t2i {t2i.shape}, text_to_image {text_to_image.shape} disagree')
  correct = t2i[np.arange(n_txt), text_to_image]
  t_ranks = np.sum(t2i >= correct[:, None], axis=1) - 1
  positive = text_to_image[None, :] == np.arange(n_img)[:, None]
  has_caption = positive.any(axis=1)
  best = np.max(np.where(positive, i2t, -np.inf), axis=1, keepdims=True)
  i_ranks = np.sum(~positive & (i2t >= best), axis=1)[has_caption]
  out = {}
  for k in ks:
    out[f'i2t@{k}'] = 100.0 * float(np.mean(i_ranks < k))
    out[f't2i@{k}'] = 100.0 * float(np.mean(t_ranks < k))
  return out


def _embed_in_batches(encode, params, x, batch_size):
  """Runs a jitted encoder over x in fixed-size (padded) batches: one compilation."""
  out = []
  for a in range(0, len(x), batch_size):
    chunk = x[a:a + batch_size]
    out.append(np.asarray(encode(params, _pad_rows(chunk, batch_size)))[:len(chunk)])
  return np.concatenate(out)


class Evaluator:
  """Held-out zero-shot retrieval; `run(params)` yields (name, value) pairs.

  `encode_image(params, images)` / `encode_text(params, tokens)` return
  L2-normalised embeddings; `data` holds `image`, `text`, `text_to_image`.
  """

  def __init__(self, encode_image, encode_text, data, batch_size=256, ks=(1, 5, 10)):
    self.encode_image, self.encode_text = jax.jit(encode_image), jax.jit(encode_text)
    self.data, self.batch_size, self.ks = data, batch_size, ks

  def embed(self, params):
    return (_embed_in_batches(self.encode_image, params, self.data['image'], self.batch_size),
            _embed_in_batches(self.encode_text, params, self.data['text'], self.batch_size))

  def run(self, params):
    image_emb, text_emb = self.embed(params)
    for key, value in recall_at_k(image_emb, text_emb, self.data['text_to_image'], self.ks).items():
      yield f'retrieval/{key}', value


def format_table(metrics: dict, ks=(1, 5, 10)) -> str:
  """A small text table of R@K in both directions."""
  head = 'direction  ' + '  '.join(f'R@{k:<5}' for k in ks)
  rows = [head]
  for d, name in (('i2t', 'image->text'), ('t2i', 'text->image')):
    vals = [metrics.get(f'retrieval/{d}@{k}', metrics.get(f'{d}@{k}')) for k in ks]
    rows.append(f'{name:<11}' + '  '.join(f'{v:6.2f}' for v in vals))
  return '\n'.join(rows)
