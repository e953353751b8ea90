"""Losses against naive numpy implementations of the papers' formulas."""
import numpy as np
import pytest

from vlp import losses


def _normalized(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive_softmax(img, txt, scale, eps):
  n = len(img)
  total = 0.0
  for direction in range(2):
    a, b = (img, txt) if direction == 0 else (txt, img)
    for i in range(n):
      logits = [scale * float(np.dot(a[i], b[j])) for j in range(n)]
      m = max(logits)
      log_z = m + np.log(sum(np.exp(l - m) for l in logits))
      for j in range(n):
        target = (1 - eps) * (i == j) + eps / n
        total -= target * (logits[j] - log_z) / n
  return total / 2


def _naive_sigmoid(img, txt, scale, bias):
  n = len(img)
  total = 0.0
  for i in range(n):
    for j in range(n):
      z = 1.0 if i == j else -1.0
      total += np.log1p(np.exp(-z * (scale * float(np.dot(img[i], txt[j])) + bias)))
  return total / n


@pytest.mark.parametrize('n,d,scale,eps', [(1, 4, 1.0, 0.0), (5, 8, 1.0, 0.0), (7, 16, 14.3, 0.1), (4, 3, 100.0, 0.3)])
def test_softmax_contrastive_matches_naive(n, d, scale, eps):
  rng = np.random.default_rng(n * 31 + d)
  img, txt = _normalized(rng, n, d), _normalized(rng, n, d)
  got = float(losses.softmax_contrastive(img, txt, scale, label_smoothing=eps))
  np.testing.assert_allclose(got, _naive_softmax(img, txt, scale, eps), rtol=1e-5)


def test_softmax_contrastive_is_low_for_matching_pairs():
  rng = np.random.default_rng(0)
  x = _normalized(rng, 8, 32)
  assert float(losses.softmax_contrastive(x, x, 100.0)) < 1e-3
  assert float(losses.softmax_contrastive(x, x[::-1], 100.0)) > 1.0


@pytest.mark.parametrize('n,d,scale,bias', [(1, 4, 10.0, -10.0), (6, 8, 10.0, -10.0), (5, 16, 3.0, 0.5)])
def test_sigmoid_contrastive_matches_naive(n, d, scale, bias):
  rng = np.random.default_rng(n * 7 + d)
  img, txt = _normalized(rng, n, d), _normalized(rng, n, d)
  got = float(losses.sigmoid_contrastive(img, txt, scale, bias))
  np.testing.assert_allclose(got, _naive_sigmoid(img, txt, scale, bias), rtol=1e-5)
