"""`vlp bench retrieval`: tiled rank counting vs the dense top-k of common CLIP benchmarks.

References: clip_benchmark's metric ported step for step (full matrix, dense
positive pairs, per K a batched top-k + one-hot) and the leanest dense
variant (full matrix, one top-k per direction, one jit).

Random unit embeddings with several captions per image (5 per image for 25k
texts x 5k images, COCO's shape). Both sides are jitted and timed after a
warm-up call (compile excluded), median of `repeats`; one JSON line.
"""
import argparse
import json
import time

import numpy as np

from vlp.eval import retrieval


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _time(fn, repeats):
  fn()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _tile_bytes(texts, images, chunk) -> int:
  """The float32 scores of one tile of the chunked pass."""
  rows, cols, _ = retrieval.tile_sizes(texts, images, chunk)
  return rows * cols * 4


def run(images=5000, texts=25000, dim=512, chunk=256, repeats=3, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  image_emb = _unit(rng, images, dim)
  text_to_image = np.arange(texts, dtype=np.int32) % images
  text_emb = image_emb[text_to_image] + 0.1 * _unit(rng, texts, dim)  # captions near their image
  text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
  ours = retrieval.recall_at_k(image_emb, text_emb, text_to_image, chunk=chunk)
  refs = {'clip_benchmark': retrieval.clip_benchmark_recall_at_k, 'dense_topk': retrieval.dense_recall_at_k}
  same = all(abs(ours[k] - v) < 1e-9 for ref in refs.values()
             for k, v in ref(image_emb, text_emb, text_to_image).items())
  t_ours = _time(lambda: retrieval.recall_at_k(image_emb, text_emb, text_to_image, chunk=chunk), repeats)
  times = {name: _time(lambda ref=ref: ref(image_emb, text_emb, text_to_image), repeats)
           for name, ref in refs.items()}
  return {'images': images, 'texts': texts, 'dim': dim, 'chunk': chunk,
          'chunked_s': round(t_ours, 4), 'clip_benchmark_s': round(times['clip_benchmark'], 4),
          'speedup': round(times['clip_benchmark'] / t_ours, 2),
          'dense_topk_s': round(times['dense_topk'], 4),
          'speedup_vs_dense_topk': round(times['dense_topk'] / t_ours, 2),
          'same_recalls': same,
          'tile_mb': round(_tile_bytes(texts, images, chunk) / 2**20, 1),
          'dense_matrix_mb': round(images * texts * 4 / 2**20, 1)}


def main(argv):
  p = argparse.ArgumentParser(prog='vlp bench retrieval', description=__doc__)
  p.add_argument('--images', type=int, default=5000)
  p.add_argument('--texts', type=int, default=25000)
  p.add_argument('--dim', type=int, default=512)
  p.add_argument('--chunk', type=int, default=256)
  p.add_argument('--repeats', type=int, default=3)
  a = p.parse_args(argv)
  print(json.dumps(run(a.images, a.texts, a.dim, a.chunk, a.repeats)))
