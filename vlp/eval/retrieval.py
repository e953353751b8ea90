"""Zero-shot retrieval: recall@K in both directions with several captions per image.

Recall needs only the rank of the correct item, not a sorted list: for every
query, count the candidates that score at least as high as the correct one.
That is a compare-and-sum over the similarities, fused by XLA with the matmul
that produces them, where the usual benchmark code (full matrix, then top-k)
sorts. The similarities are made a tile of `chunk` captions x an eighth of the
images at a time inside one `jax.jit` (`lax.fori_loop`), so memory stays
O(chunk x N / 8 + N + M) however many images and captions there are (1M x 1M
fits), and nothing goes back to the host between tiles.

The rules, the same for every evaluator and for `vlp bench quality`:
- A tie counts against the query (the pessimistic rank): a target's rank is 1 + the
  candidates scoring strictly higher + the other non-target candidates scoring exactly as
  high. Image->text ranks the image's best caption. Every score, the targets' included,
  comes from the same matmul of tiles (the tiles holding targets run first, through the
  same loop), so equal embeddings tie exactly whatever the float rounding of other ways
  to compute a dot product; `ties_i2t` / `ties_t2i` count the queries whose target ties
  a non-target.
- A caption text (its token ids) attached to one image more than once counts once
  (`distinct_captions`; `duplicate_captions` counts the rest), and each distinct text is
  embedded once, so captions of equal text score exactly alike.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vlp.eval import embed

CAPTION_KEYS = ('text', 'text_to_image', 'language')  # an eval set's arrays with one row per caption
COUNTS = ('ties_i2t', 'ties_t2i', 'duplicate_captions')  # metrics that are counts, not percentages
IMAGE_CHUNKS = 8  # a tile spans this share of the images (at least `chunk` of them)


def tile_sizes(n_txt: int, n_img: int, chunk: int) -> tuple[int, int, int]:
  """(caption rows, image columns, image chunks) of a tile: `chunk` captions against an eighth
  of the images. Wide tiles keep the matmul efficient and the loop short; the target tiles run
  twice, about 1/8 to 1/4 more matmul."""
  rows, cols = min(chunk, n_txt), min(n_img, max(chunk, -(-n_img // IMAGE_CHUNKS)))
  return rows, cols, -(-n_img // cols)


def target_tiles(text_to_image, n_img: int, chunk: int = 256) -> np.ndarray:
  """int32 [T, 2]: the (caption chunk, image chunk) tiles that hold a caption and its image
  (one or two per caption chunk when captions come image by image)."""
  text_to_image = np.asarray(text_to_image)
  rows, cols, n_cols = tile_sizes(len(text_to_image), n_img, chunk)
  keys = np.unique(np.arange(len(text_to_image)) // rows * n_cols + text_to_image // cols)
  return np.stack([keys // n_cols, keys % n_cols], axis=1).astype(np.int32)


@functools.partial(jax.jit, static_argnames='chunk')
def ranks(image_emb, text_emb, text_to_image, tiles, chunk=256) -> dict:
  """{'t2i': int [M], 't2i_tied': bool [M], 'i2t': int [N], 'i2t_tied': bool [N]}: for every
  caption and every image, the non-targets scoring at least as high as its (best) target, and
  whether one scores exactly as high. An image without captions ranks below everything.

  One loop over tiles: first `tiles` (target_tiles), which give every caption's own score and
  every image's best caption's score (and how many of its captions score that), then every
  tile, which counts the captions and images scoring at least as high and exactly as high. A
  tile's one matmul serves both, so a target's score is the same bits in both; its own count
  is taken off at the end. Tiles are slices of the inputs (no padded copy); the last chunk
  each way is shifted back to end at the last row, its scores seen before set to -inf."""
  n_txt, n_img = text_emb.shape[0], image_emb.shape[0]
  rows, cols, n_cols = tile_sizes(n_txt, n_img, chunk)
  n_first = tiles.shape[0]

  def thresholds(sims, images, own, best):
    """A target tile: each row's target score, each column's best target score and how many
    of its targets score that. images: the rows' images less the tile's first."""
    del own, best
    target = images[:, None] == jnp.arange(cols)[None, :]
    on_target = jnp.where(target, sims, -jnp.inf)
    col_max = jnp.max(on_target, axis=0)
    at_max = jnp.where(jnp.isfinite(col_max), jnp.sum(target & (sims == col_max), axis=0, dtype=jnp.int32), 0)
    return jnp.max(on_target, axis=1), jnp.zeros((2, rows), jnp.int32), col_max, at_max, jnp.zeros((2, cols), jnp.int32)

  def counts(sims, images, own, best):
    """Any tile: how many of each row and column score >= and == its threshold."""
    del images
    above = lambda t, axis: jnp.stack([jnp.sum(sims >= t, axis=axis, dtype=jnp.int32),
                                       jnp.sum(sims == t, axis=axis, dtype=jnp.int32)])
    return (jnp.full(rows, -jnp.inf), above(own[:, None], 1), jnp.full(cols, -jnp.inf), jnp.zeros(cols, jnp.int32),
            above(best[None, :], 0))

  def step(k, carry):
    first = k < n_first
    rest = jnp.maximum(k - n_first, 0)
    c, ic = jnp.where(first, tiles[jnp.minimum(k, n_first - 1)], jnp.stack([rest // n_cols, rest % n_cols]))
    r0, c0 = jnp.minimum(c * rows, n_txt - rows), jnp.minimum(ic * cols, n_img - cols)
    new = (r0 + jnp.arange(rows) >= c * rows)[:, None] & (c0 + jnp.arange(cols) >= ic * cols)[None, :]
    sims = jax.lax.dynamic_slice_in_dim(text_emb, r0, rows) @ jax.lax.dynamic_slice_in_dim(image_emb, c0, cols).T
    sims = jnp.where(new, sims, -jnp.inf)  # a score a shifted chunk saw before counts once
    images = jax.lax.dynamic_slice_in_dim(text_to_image, r0, rows) - c0
    row, col = ({k: jax.lax.dynamic_slice_in_dim(v, start, size) for k, v in carry[side].items()}
                for side, start, size in (('row', r0, rows), ('col', c0, cols)))
    # a target tile gives maxima (-inf from any other) and no counts; any other, counts alone
    row_max, row_counts, col_max, at_max, col_counts = jax.lax.cond(first, thresholds, counts, sims, images,
                                                                    row['own'], col['own'])
    n_own = jnp.where(col_max > col['own'], at_max, col['n_own'] + jnp.where(col_max == col['own'], at_max, 0))
    row = {'own': jnp.maximum(row['own'], row_max), 'ge': row['ge'] + row_counts[0], 'eq': row['eq'] + row_counts[1]}
    col = {'own': jnp.maximum(col['own'], col_max), 'n_own': n_own, 'ge': col['ge'] + col_counts[0],
           'eq': col['eq'] + col_counts[1]}
    return {side: {k: jax.lax.dynamic_update_slice_in_dim(carry[side][k], v, start, 0) for k, v in part.items()}
            for side, start, part in (('row', r0, row), ('col', c0, col))}

  start = lambda n, **extra: {'own': jnp.full(n, -jnp.inf), 'ge': jnp.zeros(n, jnp.int32),
                              'eq': jnp.zeros(n, jnp.int32), **extra}
  out = jax.lax.fori_loop(0, n_first + -(-n_txt // rows) * n_cols, step,
                          {'row': start(n_txt), 'col': start(n_img, n_own=jnp.zeros(n_img, jnp.int32))})
  row, col = out['row'], out['col']  # a caption's own image, an image's best captions, counted: off
  return {'t2i': row['ge'] - 1, 't2i_tied': row['eq'] > 1,
          'i2t': col['ge'] - col['n_own'], 'i2t_tied': col['eq'] > col['n_own']}


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


def query_ranks(image_emb, text_emb, text_to_image, chunk=256) -> dict:
  """`ranks` as numpy, image->text only for the images that have a caption."""
  image_emb, text_emb, text_to_image = _check(image_emb, text_emb, text_to_image)
  if not (len(image_emb) and len(text_emb)):
    raise ValueError(f'retrieval needs images and captions, got {len(image_emb)} and {len(text_emb)}')
  tiles = target_tiles(text_to_image, len(image_emb), chunk)
  out = {k: np.asarray(v) for k, v in ranks(image_emb, text_emb, text_to_image, tiles, chunk=chunk).items()}
  captioned = np.bincount(text_to_image, minlength=len(image_emb)) > 0
  out['i2t'], out['i2t_tied'] = out['i2t'][captioned], out['i2t_tied'][captioned]
  return out


def _recall(query_ranks_: dict, ks) -> dict:
  return {f'{d}@{k}': 100.0 * float(np.mean(query_ranks_[d] < k)) for k in ks for d in ('i2t', 't2i')}


def recall_at_k(image_emb, text_emb, text_to_image, ks=(1, 5, 10), chunk=256) -> dict:
  """Recall@K in percent; keys `i2t@K` and `t2i@K`.

  `text_to_image[j]` is the image index of caption j. Image->text counts a hit
  when any caption of the image is in its top K (CLIP convention); images
  without captions are left out. Text->image averages over all captions.
  Ties count against (the module's rules). Scores are made `chunk` captions at a time.
  """
  return _recall(query_ranks(image_emb, text_emb, text_to_image, chunk), ks)


def distinct_captions(tokens, text_to_image) -> dict:
  """The captions of an eval set that count, and the texts to embed for them: {'keep': the
  indices of the captions kept (of each token row an image has more than once, the first),
  'texts': the distinct token rows among them, 'text_of': each kept caption's row of texts}."""
  tokens, text_to_image = np.asarray(tokens), np.asarray(text_to_image)
  _, first = np.unique(np.concatenate([text_to_image[:, None], tokens], axis=1), axis=0, return_index=True)
  keep = np.sort(first)
  texts, text_of = np.unique(tokens[keep], axis=0, return_inverse=True)
  return {'keep': keep, 'texts': texts, 'text_of': text_of.reshape(-1)}


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
  """recall_at_k plus 'rsum' and the ties counted against ('ties_i2t', 'ties_t2i': queries), and
  with a language per caption the recalls of every language alone, as '<lang>/i2t@1' ... (images
  without a caption in that language are left out of its image->text)."""
  found = query_ranks(image_emb, text_emb, text_to_image)
  out = _recall(found, ks)
  out['rsum'] = rsum(out, ks)
  out.update(ties_i2t=int(found['i2t_tied'].sum()), ties_t2i=int(found['t2i_tied'].sum()))
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
  `language` (one per caption) arrays (vlp.data.eval_set); a caption an image has
  twice is kept once (`distinct_captions`). Every device of the params' mesh
  embeds its share (vlp.eval.embed), each distinct text once.
  """

  RERANKINGS = ()  # (metric prefix, title) of re-ranked results besides the plain ones

  def __init__(self, predict_fns, data, batch_size=256, ks=(1, 5, 10), by_language=True):
    self.encode_image, self.encode_text = embed.Encoder(predict_fns['image']), embed.Encoder(predict_fns['text'])
    captions = distinct_captions(data['text'], data['text_to_image'])
    self.duplicate_captions = len(data['text']) - len(captions['keep'])
    self.texts, self.text_of = captions['texts'], captions['text_of']
    self.data = {**data, **{k: np.asarray(data[k])[captions['keep']] for k in CAPTION_KEYS if k in data}}
    self.batch_size, self.ks, self.by_language = batch_size, tuple(ks), by_language

  def embed(self, params):
    return (self.encode_image(params, self.data['image'], self.batch_size, self.data.get('image_rows')),
            self.encode_text(params, self.texts, self.batch_size)[self.text_of])

  def run(self, params):
    yield from self.itc_metrics(*self.embed(params))

  def itc_metrics(self, image_emb, text_emb):
    """(name, value) of the embeddings' retrieval (evaluate) and the duplicate captions left out."""
    languages = self.data.get('language') if self.by_language else None
    yield from evaluate(image_emb, text_emb, self.data['text_to_image'], languages, self.ks).items()
    yield 'duplicate_captions', self.duplicate_captions


def format_table(metrics: dict, ks=(1, 5, 10)) -> str:
  """A small text table of R@K in both directions (keys 'i2t@1' ... of one evaluator)."""
  head = 'direction    ' + '  '.join(f'R@{k:<4}' for k in ks)
  rows = [head]
  for d, name in (('i2t', 'image->text'), ('t2i', 'text->image')):
    rows.append(f'{name:<13}' + '  '.join(f'{metrics[f"{d}@{k}"]:6.2f}' for k in ks))
  if 'rsum' in metrics:
    rows.append(f'RSUM {metrics["rsum"]:.1f}')
  if 'ties_i2t' in metrics:
    rows.append(f'ties counted against: {metrics["ties_i2t"]} image queries, {metrics["ties_t2i"]} caption queries; '
                f'duplicate captions of an image counted once: {metrics.get("duplicate_captions", 0)}')
  return '\n'.join(rows)
