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


@pytest.mark.parametrize('head,chunk,eps', [('softmax', 4, 0.0), ('softmax', 8, 0.1), ('softmax', 32, 0.2),
                                            ('sigmoid', 4, None), ('sigmoid', 16, None)])
def test_chunked_losses_equal_the_whole_matrix_with_gradients(head, chunk, eps):
  import jax
  rng = np.random.default_rng(chunk)
  img, txt = _normalized(rng, 32, 8).astype(np.float32), _normalized(rng, 32, 8).astype(np.float32)
  if head == 'softmax':
    whole = lambda x, y, s, b: losses.softmax_contrastive(x, y, s, eps)
    chunked = lambda x, y, s, b: losses.chunked_softmax_contrastive(x, y, s, eps, chunk_size=chunk)
    scale, bias = 14.3, 0.0
    assert float(whole(img, txt, scale, bias)) == pytest.approx(_naive_softmax(img, txt, scale, eps), rel=1e-5)
  else:
    whole = lambda x, y, s, b: losses.sigmoid_contrastive(x, y, s, b)
    chunked = lambda x, y, s, b: losses.chunked_sigmoid_contrastive(x, y, s, b, chunk_size=chunk)
    scale, bias = 10.0, -10.0
  np.testing.assert_allclose(chunked(img, txt, scale, bias), whole(img, txt, scale, bias), rtol=1e-5)
  grads = lambda f: jax.grad(f, argnums=(0, 1, 2, 3))(img, txt, scale, bias)
  for g_chunked, g_whole in zip(grads(chunked), grads(whole)):
    np.testing.assert_allclose(g_chunked, g_whole, atol=1e-5)


def test_chunked_loss_never_holds_the_whole_logit_matrix():
  import jax
  from jax.extend.core import jaxprs_in_params
  rng = np.random.default_rng(0)
  img, txt = _normalized(rng, 64, 8).astype(np.float32), _normalized(rng, 64, 8).astype(np.float32)
  grad = jax.grad(lambda x, y: losses.chunked_softmax_contrastive(x, y, 10.0, chunk_size=8), argnums=(0, 1))

  def shapes(jaxpr):  # every intermediate, also inside the scans and remats of forward and backward
    for eq in jaxpr.eqns:
      yield from (tuple(v.aval.shape) for v in eq.outvars)
      for sub in jaxprs_in_params(eq.params):
        yield from shapes(sub)

  seen = set(shapes(jax.make_jaxpr(grad)(img, txt).jaxpr))
  assert (8, 64) in seen and (64, 64) not in seen
