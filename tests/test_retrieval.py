"""recall_at_k against a naive sort-based implementation."""
import numpy as np
import pytest

from vlp.eval.retrieval import recall_at_k


def _naive(img, txt, t2i, ks):
  sims = img @ txt.T
  out = {}
  for k in ks:
    hits = []
    for i in range(len(img)):
      pos = [j for j in range(len(txt)) if t2i[j] == i]
      if not pos:
        continue
      best = max(sims[i, j] for j in pos)
      # ties count against: wrong captions scoring >= the best correct one come first
      rank = sum(1 for j in range(len(txt)) if t2i[j] != i and sims[i, j] >= best)
      hits.append(rank < k)
    out[f'i2t@{k}'] = 100.0 * np.mean(hits)
    hits = []
    for j in range(len(txt)):
      correct = sims[t2i[j], j]
      rank = sum(1 for i in range(len(img)) if i != t2i[j] and sims[i, j] >= correct)
      hits.append(rank < k)
    out[f't2i@{k}'] = 100.0 * np.mean(hits)
  return out


@pytest.mark.parametrize('n_img,caps,d,chunk', [(20, 5, 8, 7), (13, 1, 4, 1024), (30, 3, 16, 4)])
def test_recall_matches_naive(n_img, caps, d, chunk):
  rng = np.random.default_rng(n_img)
  img = rng.normal(size=(n_img, d)).astype(np.float32)
  t2i = np.repeat(np.arange(n_img), caps)
  txt = (img[t2i] + 1.5 * rng.normal(size=(len(t2i), d))).astype(np.float32)
  ks = (1, 5, 10)
  got = recall_at_k(img, txt, t2i, ks, chunk=chunk)
  want = _naive(img, txt, t2i, ks)
  for key in want:
    assert got[key] == pytest.approx(want[key]), key


def test_uneven_captions_ties_and_uncaptioned_images():
  img = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], np.float32)  # image 2 ties image 0
  txt = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], np.float32)
  t2i = np.array([0, 1, 1, 2])  # image 3 has no caption
  got = recall_at_k(img, txt, t2i, ks=(1, 2))
  assert got == pytest.approx(_naive(img, txt, t2i, (1, 2)))
  # captions 0 and 3 tie between images 0 and 2: a tie counts against, so R@1 misses both
  assert got['t2i@1'] == pytest.approx(50.0)
  assert got['t2i@2'] == pytest.approx(100.0)


def test_perfect_embeddings_give_full_recall():
  img = np.eye(6, dtype=np.float32)
  t2i = np.array([0, 0, 1, 2, 3, 4, 5, 5])
  got = recall_at_k(img, img[t2i], t2i, ks=(1,))
  assert got == {'i2t@1': 100.0, 't2i@1': 100.0}


def test_bad_mapping_is_a_clear_error():
  with pytest.raises(ValueError, match='outside'):
    recall_at_k(np.eye(2), np.eye(2), np.array([0, 2]))


def test_duplicate_images_uneven_captions_and_padding_chunk():
  """Exact ties from duplicated images, 0-4 captions per image, a chunk that does not divide M."""
  rng = np.random.default_rng(3)
  img = rng.integers(-2, 3, size=(12, 6)).astype(np.float32)
  img[5] = img[2]  # an exact duplicate: every score ties
  t2i = np.concatenate([np.full(n, i) for i, n in enumerate([1, 4, 0, 2, 3, 1, 0, 2, 1, 3, 2, 1])])
  txt = (img[t2i] + rng.integers(-1, 2, size=(len(t2i), 6))).astype(np.float32)
  ks = (1, 3, 5)
  for chunk in (1, 4, 7, 100):
    assert recall_at_k(img, txt, t2i, ks, chunk=chunk) == pytest.approx(_naive(img, txt, t2i, ks)), chunk


def test_dense_references_agree_without_ties():
  from vlp.eval.retrieval import clip_benchmark_recall_at_k, dense_recall_at_k
  rng = np.random.default_rng(0)
  img = rng.normal(size=(40, 16)).astype(np.float32)
  t2i = rng.integers(0, 40, size=130)
  txt = (img[t2i] + rng.normal(size=(130, 16))).astype(np.float32)
  want = _naive(img, txt, t2i, (1, 5, 10))
  assert dense_recall_at_k(img, txt, t2i) == pytest.approx(want)
  assert clip_benchmark_recall_at_k(img, txt, t2i, batch_size=16) == pytest.approx(want)


def test_rsum_and_per_language_results():
  from vlp.eval.retrieval import evaluate
  rng = np.random.default_rng(1)
  img = rng.normal(size=(10, 8)).astype(np.float32)
  t2i = np.repeat(np.arange(10), 3)[:-2]  # the last image has one caption: no 'de' or 'fr' one
  langs = np.array(['en', 'de', 'fr'] * 10)[:-2]
  txt = (img[t2i] + 1.2 * rng.normal(size=(len(t2i), 8))).astype(np.float32)
  got = evaluate(img, txt, t2i, langs)
  want = _naive(img, txt, t2i, (1, 5, 10))
  assert got['rsum'] == pytest.approx(sum(want.values()))
  for lang in ('en', 'de', 'fr'):
    keep = langs == lang
    img_ids = np.unique(t2i[keep])  # images with a caption in this language
    per = _naive(img, txt[keep], t2i[keep], (1, 5, 10))  # the naive one skips uncaptioned images
    assert {k: got[f'{lang}/{k}'] for k in per} == pytest.approx(per), lang
    assert len(img_ids) == (10 if lang == 'en' else 9)
  assert 'en/rsum' in got and set(evaluate(img, txt, t2i)) == set(want) | {'rsum', 'ties_i2t', 'ties_t2i'}


def test_chunked_memory_is_bounded_for_a_million_by_a_million():
  """Compiled (not run) for 1M images x 1M captions: the temporaries stay a few chunk x N blocks
  (the full matrix would be 4 TB): the image rows of a tile (N / 8 of them), a few
  [chunk, N / 8] score tiles and vectors of N and M."""
  import jax
  import jax.numpy as jnp
  from vlp.eval.retrieval import IMAGE_CHUNKS, ranks
  n, d = 1_000_000, 512
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  for chunk in (32, 64):
    tiles = spec(2 * n // chunk, 2, dtype=jnp.int32)
    compiled = ranks.lower(spec(n, d), spec(n, d), spec(n, dtype=jnp.int32), tiles, chunk=chunk).compile()
    temps = compiled.memory_analysis().temp_size_in_bytes
    assert temps <= 4 * chunk * n * 4, (chunk, temps / 2**20)
    tile = chunk * n // IMAGE_CHUNKS * 4
    assert temps <= n // IMAGE_CHUNKS * d * 4 + 4 * tile + 16 * n * 4, (chunk, temps / 2**20)


def test_bench_retrieval_prints_one_json_line(capsys):
  import json
  from vlp import cli
  assert cli.main(['bench', 'retrieval', '--images=60', '--texts=150', '--dim=16', '--chunk=32', '--repeats=1']) == 0
  result = json.loads(capsys.readouterr().out.strip())
  assert result['same_recalls'] and result['texts'] == 150
  assert result['speedup'] > 0 and result['speedup_vs_dense_topk'] > 0
