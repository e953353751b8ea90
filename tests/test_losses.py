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


def _naive_softmax_grads(img, txt, scale, eps):
  """d loss / d (img, txt, scale) of the softmax loss, from d loss / d logits =
  (softmax over the row - target + softmax over the column - target) / 2B."""
  n = len(img)
  dots = img @ txt.T
  logits = scale * dots
  rows = np.exp(logits - logits.max(1, keepdims=True))
  rows /= rows.sum(1, keepdims=True)
  cols = np.exp(logits - logits.max(0, keepdims=True))
  cols /= cols.sum(0, keepdims=True)
  target = (1 - eps) * np.eye(n) + eps / n
  dl = (rows - target + cols - target) / (2 * n)
  return scale * dl @ txt, scale * dl.T @ img, np.sum(dl * dots), 0.0


def _naive_sigmoid_grads(img, txt, scale, bias):
  """d loss / d logits = -z sigmoid(-z logits) / B."""
  n = len(img)
  dots = img @ txt.T
  z = 2 * np.eye(n) - 1
  dl = -z / (1 + np.exp(z * (scale * dots + bias))) / n
  return scale * dl @ txt, scale * dl.T @ img, np.sum(dl * dots), np.sum(dl)


_SHARDED = {  # name -> (head, loss(x, y, scale, bias, eps, mesh))
    'softmax': ('softmax', lambda x, y, s, b, e, m: losses.softmax_contrastive(x, y, s, e, mesh=m)),
    'softmax_chunked': ('softmax', lambda x, y, s, b, e, m: losses.chunked_softmax_contrastive(
        x, y, s, e, chunk_size=4, mesh=m)),
    'softmax_ring': ('softmax', lambda x, y, s, b, e, m: losses.ring_softmax_contrastive(x, y, s, e, mesh=m)),
    'sigmoid': ('sigmoid', lambda x, y, s, b, e, m: losses.sigmoid_contrastive(x, y, s, b, mesh=m)),
    'sigmoid_chunked': ('sigmoid', lambda x, y, s, b, e, m: losses.chunked_sigmoid_contrastive(
        x, y, s, b, chunk_size=4, mesh=m)),
    'sigmoid_ring': ('sigmoid', lambda x, y, s, b, e, m: losses.ring_sigmoid_contrastive(x, y, s, b, mesh=m)),
}
_MESHES = [{'data': 8}, {'data': 2, 'fsdp': 2, 'tensor': 2}]  # the batch over one axis, over two beside another


@pytest.mark.parametrize('sizes', _MESHES, ids=lambda s: '-'.join(f'{k}{v}' for k, v in s.items()))
@pytest.mark.parametrize('name', sorted(_SHARDED))
def test_losses_on_the_batch_devices_equal_the_formula_with_gradients(name, sizes):
  import jax
  from vlp.core import parallel
  head, loss = _SHARDED[name]
  mesh = parallel.make_mesh(sizes)
  rng = np.random.default_rng(len(name))
  img, txt = _normalized(rng, 64, 8), _normalized(rng, 64, 8)
  scale, bias, eps = (14.3, 0.0, 0.1) if head == 'softmax' else (10.0, -3.0, 0.0)
  naive = _naive_softmax(img, txt, scale, eps) if head == 'softmax' else _naive_sigmoid(img, txt, scale, bias)
  naive_grads = (_naive_softmax_grads if head == 'softmax' else _naive_sigmoid_grads)(
      img, txt, scale, bias if head == 'sigmoid' else eps)
  x, y = img.astype(np.float32), txt.astype(np.float32)
  f = jax.jit(jax.value_and_grad(lambda *a: loss(*a, eps, mesh), argnums=(0, 1, 2, 3)))
  value, grads = f(x, y, np.float32(scale), np.float32(bias))
  np.testing.assert_allclose(value, naive, rtol=1e-6)
  # 1e-6, relative where a gradient is large: d/d bias sums B^2 terms (about 6.4 here), f32's ulp there is 4.8e-7
  for got, want in zip(grads, naive_grads):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # and the same as the whole batch on one device
  whole, whole_grads = jax.jit(jax.value_and_grad(lambda *a: loss(*a, eps, None), argnums=(0, 1, 2, 3)))(
      x, y, np.float32(scale), np.float32(bias))
  np.testing.assert_allclose(value, whole, rtol=1e-6)
  for got, want in zip(grads, whole_grads):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _compiled_shapes(loss, mesh, n=64, d=8):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vlp.core import parallel
  rows = jax.ShapeDtypeStruct((n, d), np.float32, sharding=NamedSharding(mesh, P(parallel.BATCH_AXES)))
  scalar = jax.ShapeDtypeStruct((), np.float32, sharding=NamedSharding(mesh, P()))
  grad = jax.jit(jax.grad(lambda x, y, s, b: loss(x, y, s, b, 0.1, mesh), argnums=(0, 1, 2, 3)))
  return grad.lower(rows, rows, scalar, scalar).compile().as_text()


@pytest.mark.parametrize('name', ['softmax', 'sigmoid', 'softmax_ring', 'sigmoid_ring'])
def test_each_device_holds_its_rows_of_the_logits_or_a_ring_block(name):
  """8 devices, 64 rows: the per-device program has [8, 64] logits (gather) or [8, 8]
  blocks and no gathered text (ring), never [64, 64]."""
  from vlp.core import parallel
  hlo = _compiled_shapes(_SHARDED[name][1], parallel.make_mesh({'data': 8}))
  assert 'f32[64,64]' not in hlo
  if name.endswith('ring'):
    assert 'f32[8,8]' in hlo and 'f32[64,8]' not in hlo and 'f32[8,64]' not in hlo
    assert 'collective-permute' in hlo and 'all-gather' not in hlo
  else:
    assert 'f32[8,64]' in hlo and 'f32[64,8]' in hlo  # the gathered text
