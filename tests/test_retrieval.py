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
