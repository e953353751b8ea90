"""Zero-shot retrieval: recall@K in both directions with several captions per image.

Recall needs only the rank of the correct item, not a sorted list: for every
query, count the candidates that score at least as high as the correct one.
That is one compare-and-sum over each row of similarities, fused by XLA with
the matmul that produces the row, where the usual benchmark code (full matrix,
then top-k) sorts. Rows are processed in chunks inside one `jax.jit`
(`lax.fori_loop`), so memory stays O(chunk x N) however many images and captions
there are (1M x 1M fits), and nothing goes back to the host between chunks.

Ties count against the model: a wrong candidate that scores exactly as high as
the correct one is ranked before it. (The correct scores come from row-wise
dot products, the others from the chunk's matmul, so a near-tie within float32
rounding may go either way.)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlp.eval import embed

BLOCK_BYTES = 2**28  # largest [chunk, N] float32 similarity block recall_at_k makes (256 MB)


@functools.partial(jax.jit, static_argnames='chunk')
def ranks(image_emb, text_emb, text_to_image, chunk=256):
  """(text_ranks [M], image_ranks [N]) in one pass over chunks of captions.

  A caption's rank: images other than its own scoring >= its own image. An
  image's rank: captions of other images scoring >= its best caption. Every
  similarity is computed once: a chunk's [chunk, N] block gives its captions'
  ranks (rows) and adds to every image's rank (columns), against the correct
  scores computed up front from row-wise dot products. Chunks are slices of
  the inputs (no padded copy); the last one is shifted back to end at M and
  its rows seen before count only once. Needs chunk <= M.
  """
  n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
  steps = -(-n_txt // chunk)

  def chunk_of(i, *xs):
    start = jnp.minimum(i * chunk, n_txt - chunk)
    return start, *(jax.lax.dynamic_slice_in_dim(x, start, chunk) for x in xs)

  def correct_step(i, correct):  # chunked too: image_emb[text_to_image] would be an [M, D] copy
    start, texts, target = chunk_of(i, text_emb, text_to_image)
    return jax.lax.dynamic_update_slice_in_dim(correct, jnp.einsum('cd,cd->c', texts, image_emb[target]), start, 0)

  correct = jax.lax.fori_loop(0, steps, correct_step, jnp.zeros(n_txt, jnp.float32))
  best = jax.ops.segment_max(correct, text_to_image, num_segments=n_img)  # -inf without captions
  image_ids = jnp.arange(n_img, dtype=text_to_image.dtype)

  def step(i, carry):
    image_rank, text_rank = carry
    start, texts, target, score = chunk_of(i, text_emb, text_to_image, correct)
    sims = texts @ image_emb.T
    other = image_ids[None, :] != target[:, None]
    rank = jnp.sum(other & (sims >= score[:, None]), axis=1)
    new = (start + jnp.arange(chunk) >= i * chunk)[:, None]  # rows of the shifted last chunk seen before: no
    image_rank += jnp.sum(new & other & (sims >= best[None, :]), axis=0)
    return image_rank, jax.lax.dynamic_update_slice_in_dim(text_rank, rank, start, 0)

  image_rank, text_rank = jax.lax.fori_loop(
      0, steps, step, (jnp.zeros(n_img, jnp.int32), jnp.zeros(n_txt, jnp.int32)))
  return text_rank, image_rank


def _check(image_emb, text_emb, text_to_image):
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  text_to_image = np.asarray(text_to_image, np.int32)
  n_img, n_txt = len(image_emb), len(text_emb)
  if text_to_image.shape != (n_txt,):
    raise ValueError(f'text_to_image has shape {text_to_image.shape}, expected ({n_txt},)')
  if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
    raise ValueError('text_to_image holds an index outside [0, number of images)')
  return image_emb, text_emb, text_to_image


def recall_at_k(image_emb, text_emb, text_to_image, ks=(1, 5, 10), chunk=256) -> dict:
  """Recall@K in percent; keys `i2t@K` and `t2i@K`.

  `text_to_image[j]` is the image index of caption j. Image->text counts a hit
  when any caption of the image is in its top K (CLIP convention); images
  without captions are left out. Text->image averages over all captions.
  Captions go `chunk` at a time, fewer when N images would make a block
  larger than BLOCK_BYTES (64 rows for a million images).
  """
  image_emb, text_emb, text_to_image = _check(image_emb, text_emb, text_to_image)
  chunk = max(1, min(chunk, len(text_emb), BLOCK_BYTES // (4 * max(1, len(image_emb)))))
  t_ranks, i_ranks = map(np.asarray, ranks(image_emb, text_emb, text_to_image, chunk=chunk))
  i_ranks = i_ranks[np.bincount(text_to_image, minlength=len(image_emb)) > 0]
  out = {}
  for k in ks:
    out[f'i2t@{k}'] = 100.0 * float(np.mean(i_ranks < k))
    out[f't2i@{k}'] = 100.0 * float(np.mean(t_ranks < k))
  return out


@functools.partial(jax.jit, static_argnames='kmax')
def _dense_topk_hits(image_emb, text_emb, text_to_image, kmax):
  sims = text_emb @ image_emb.T  # the whole [texts, images] matrix
  _, top_images = jax.lax.top_k(sims, kmax)
  t2i = top_images == text_to_image[:, None]
  _, top_texts = jax.lax.top_k(sims.T, kmax)
  i2t = text_to_image[top_texts] == jnp.arange(image_emb.shape[0])[:, None]
  return jnp.cumsum(t2i, axis=1) > 0, jnp.cumsum(i2t, axis=1) > 0


def dense_recall_at_k(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict:
  """Full similarity matrix, then one top-k per direction, all in one jit: the
  dense approach at its leanest. Ties are broken by index, not counted against."""
  image_emb, text_emb, text_to_image = _check(image_emb, text_emb, text_to_image)
  t2i, i2t = _dense_topk_hits(image_emb, text_emb, text_to_image, kmax=max(ks))
  t2i, i2t = np.asarray(t2i), np.asarray(i2t)[np.bincount(text_to_image, minlength=len(image_emb)) > 0]
  out = {}
  for k in ks:
    out[f'i2t@{k}'] = 100.0 * float(np.mean(i2t[:, k - 1]))
    out[f't2i@{k}'] = 100.0 * float(np.mean(t2i[:, k - 1]))
  return out


@functools.partial(jax.jit, static_argnames='k')
def _clip_benchmark_batch(scores, positive_pairs, k):
  """clip_benchmark's recall_at_k on a batch of rows: top-k, one-hot, x positives."""
  top = jax.lax.top_k(scores, k)[1]
  onehot = jax.nn.one_hot(top, scores.shape[1], dtype=jnp.float32)
  hits = jnp.sum(onehot * positive_pairs[:, None, :], axis=(1, 2))
  return hits / jnp.sum(positive_pairs, axis=1)


def clip_benchmark_recall_at_k(image_emb, text_emb, text_to_image, ks=(1, 5, 10), batch_size=64) -> dict:
  """clip_benchmark's zero-shot retrieval metric ported to JAX step for step:
  the full score matrix and a dense positive-pair matrix, then per K and
  direction a loop over row batches (`batchify`) of top-k + one-hot. The
  reference that `vlp bench retrieval` compares against."""
  image_emb, text_emb, text_to_image = _check(image_emb, text_emb, text_to_image)
  scores = jax.jit(lambda t, i: t @ i.T)(text_emb, image_emb)
  positive_pairs = jax.nn.one_hot(text_to_image, len(image_emb), dtype=jnp.float32)

  def batchify(x, y, k):
    return np.concatenate([np.asarray(_clip_benchmark_batch(x[a:a + batch_size], y[a:a + batch_size], k))
                           for a in range(0, len(x), batch_size)])

  has_caption = np.bincount(text_to_image, minlength=len(image_emb)) > 0
  out = {}
  for k in ks:
    out[f't2i@{k}'] = 100.0 * float(np.mean(batchify(scores, positive_pairs, k) > 0))
    i2t = batchify(scores.T, positive_pairs.T, k)
    out[f'i2t@{k}'] = 100.0 * float(np.mean(i2t[has_caption] > 0))
  return out


def rsum(metrics: dict, ks=(1, 5, 10)) -> float:
  """The sum of R@K over both directions (RSUM of the retrieval literature)."""
  return sum(metrics[f'{d}@{k}'] for d in ('i2t', 't2i') for k in ks)


def evaluate(image_emb, text_emb, text_to_image, languages=None, ks=(1, 5, 10)) -> dict:
  """recall_at_k plus 'rsum', and with a language per caption the same for
  every language alone, as '<lang>/i2t@1' ... (images without a caption in
  that language are left out of its image->text)."""
  out = recall_at_k(image_emb, text_emb, text_to_image, ks)
  out['rsum'] = rsum(out, ks)
  langs = sorted(set(languages)) if languages is not None else []
  if len(langs) > 1:
    languages = np.asarray(languages)
    for lang in langs:
      keep = languages == lang
      per = recall_at_k(image_emb, np.asarray(text_emb)[keep], np.asarray(text_to_image)[keep], ks)
      per['rsum'] = rsum(per, ks)
      out.update({f'{lang}/{k}': v for k, v in per.items()})
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


class Evaluator:
  """Zero-shot retrieval; `run(params)` yields (name, value) pairs.

  predict_fns: `image(params, images)` / `text(params, tokens)` returning
  L2-normalised embeddings. data: `image` (uint8: this host's images, which
  `image_rows` names, or all of them), `text`, `text_to_image` and optionally
  `language` (one per caption) arrays (vlp.data.eval_set). Every device of the
  params' mesh embeds its share (vlp.eval.embed).
  """

  RERANKINGS = ()  # (metric prefix, title) of re-ranked results besides the plain ones

  def __init__(self, predict_fns, data, batch_size=256, ks=(1, 5, 10), by_language=True):
    self.encode_image, self.encode_text = embed.Encoder(predict_fns['image']), embed.Encoder(predict_fns['text'])
    self.data, self.batch_size, self.ks, self.by_language = data, batch_size, tuple(ks), by_language

  def embed(self, params):
    return (self.encode_image(params, self.data['image'], self.batch_size, self.data.get('image_rows')),
            self.encode_text(params, self.data['text'], self.batch_size))

  def run(self, params):
    image_emb, text_emb = self.embed(params)
    languages = self.data.get('language') if self.by_language else None
    yield from evaluate(image_emb, text_emb, self.data['text_to_image'], languages, self.ks).items()


def format_table(metrics: dict, ks=(1, 5, 10)) -> str:
  """A small text table of R@K in both directions (keys 'i2t@1' ... of one evaluator)."""
  head = 'direction    ' + '  '.join(f'R@{k:<4}' for k in ks)
  rows = [head]
  for d, name in (('i2t', 'image->text'), ('t2i', 'text->image')):
    rows.append(f'{name:<13}' + '  '.join(f'{metrics[f"{d}@{k}"]:6.2f}' for k in ks))
  if 'rsum' in metrics:
    rows.append(f'RSUM {metrics["rsum"]:.1f}')
  return '\n'.join(rows)
