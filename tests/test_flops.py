"""Analytic FLOPs vs closed forms and vs XLA's own count of plain jnp models.

The reference models here are written from scratch with jnp (not imported from
vlp), so the check is independent of the vlp model code.
"""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from vlp.bench import step as bench_step
from vlp.models import flops as F
from vlp.recipes.align import flops as align_flops


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost["flops"])


def _ln(x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + 1e-6)


def _block(x, p, heads):
  """Pre-LN encoder block: x + MHA(LN(x)); x + MLP(LN(x)). x: [B, S, W]."""
  b, s, w = x.shape
  h = _ln(x)
  q, k, v = jnp.split(h @ p["wqkv"], 3, axis=-1)
  split = lambda t: t.reshape(b, s, heads, w // heads)
  q, k, v = split(q), split(k), split(v)
  att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (w // heads) ** 0.5)
  o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, w)
  x = x + o @ p["wo"]
  h = _ln(x)
  return x + jax.nn.gelu(h @ p["w1"]) @ p["w2"]


def _block_params(w, m):
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(wqkv=z(w, 3 * w), wo=z(w, w), w1=z(w, m), w2=z(m, w))


def _encoder(x, params, heads):
  for p in params:
    x = _block(x, p, heads)
  return _ln(x)


def _pooled_encoder(x, params, heads):
  """The encoder's output at token 0 alone: its last block takes every token's key and value
  but that token's query, residual and MLP."""
  for p in params[:-1]:
    x = _block(x, p, heads)
  b, s, w = x.shape
  p, h = params[-1], _ln(x)
  wq, wk, wv = jnp.split(p["wqkv"], 3, axis=-1)
  split = lambda t: t.reshape(b, t.shape[1], heads, w // heads)
  q, k, v = split(h[:, :1] @ wq), split(h @ wk), split(h @ wv)
  att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (w // heads) ** 0.5)
  y = x[:, :1] + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, 1, w) @ p["wo"]
  y = y + jax.nn.gelu(_ln(y) @ p["w1"]) @ p["w2"]
  return _ln(y)[:, 0]


@pytest.mark.parametrize("b,s,w,m,heads", [(2, 65, 256, 1024, 4),
                                           (3, 32, 128, 512, 2),
                                           (1, 17, 64, 256, 1)])
def test_block_matches_xla_cost_analysis(b, s, w, m, heads):
  x = jnp.zeros((b, s, w), jnp.float32)
  got = b * F.block_forward_flops(s, w, m)
  ref = _xla_flops(lambda x, p: _block(x, p, heads), x, _block_params(w, m))
  # XLA also counts the elementwise ops (LN, softmax, GELU, adds): a few %.
  assert got <= ref
  assert got == pytest.approx(ref, rel=0.05)


def _tiny_cfg():
  return ml_collections.ConfigDict(dict(
      image=dict(image_size=32, patch_size=8, width=128, depth=2, num_heads=2,
                 mlp_dim=512),
      text=dict(vocab_size=100, context_length=16, width=96, depth=2,
                num_heads=2, mlp_dim=384),
      embed_dim=64))


def _vit(images, pe, cls, pos, blocks, proj, patch, heads):
  b, hgt, wid, c = images.shape
  n = hgt // patch
  x = images.reshape(b, n, patch, n, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, n * n, patch * patch * c) @ pe
  x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, x.shape[-1])), x], 1) + pos
  return _pooled_encoder(x, blocks, heads) @ proj


def _text(tokens, emb, pos, blocks, proj, heads):
  return _pooled_encoder(emb[tokens] + pos, blocks, heads) @ proj


def _align_forward(images, tokens, vparams, tparams, cfg):
  zi = _vit(images, *vparams, patch=cfg.image.patch_size,
            heads=cfg.image.num_heads)
  zt = _text(tokens, *tparams, heads=cfg.text.num_heads)
  zi = zi / jnp.linalg.norm(zi, axis=-1, keepdims=True)
  zt = zt / jnp.linalg.norm(zt, axis=-1, keepdims=True)
  logits = 10.0 * zi @ zt.T
  labels = jnp.arange(logits.shape[0])
  li = -jax.nn.log_softmax(logits, -1)[labels, labels].mean()
  lt = -jax.nn.log_softmax(logits.T, -1)[labels, labels].mean()
  return (li + lt) / 2


def _align_inputs(cfg, b):
  z = lambda *s: jnp.zeros(s, jnp.float32)
  im, tx, e = cfg.image, cfg.text, cfg.embed_dim
  n = (im.image_size // im.patch_size) ** 2
  vparams = (z(im.patch_size ** 2 * 3, im.width), z(1, 1, im.width),
             z(1, n + 1, im.width),
             [_block_params(im.width, im.mlp_dim) for _ in range(im.depth)],
             z(im.width, e))
  tparams = (z(tx.vocab_size, tx.width), z(1, tx.context_length, tx.width),
             [_block_params(tx.width, tx.mlp_dim) for _ in range(tx.depth)],
             z(tx.width, e))
  images = z(b, im.image_size, im.image_size, 3)
  tokens = jnp.zeros((b, tx.context_length), jnp.int32)
  return images, tokens, vparams, tparams


def test_towers_match_xla_cost_analysis():
  cfg, b = _tiny_cfg(), 4
  images, tokens, vparams, tparams = _align_inputs(cfg, b)
  ref_v = _xla_flops(lambda x, p: _vit(x, *p, patch=8, heads=2), images, vparams)
  ref_t = _xla_flops(lambda x, p: _text(x, *p, heads=2), tokens, tparams)
  got_v = b * F.vit_forward_flops(cfg.image, cfg.embed_dim)
  got_t = b * F.text_forward_flops(cfg.text, cfg.embed_dim)
  assert got_v == pytest.approx(ref_v, rel=0.05)
  assert got_t == pytest.approx(ref_t, rel=0.05)


def _siglip_vit(images, pe, pos, blocks, head, patch, heads):
  """SigLIP's ViT: no CLS token, a MAP head (one probe attends to the patches, then a residual
  MLP), no projection."""
  b, hgt, wid, c = images.shape
  n = hgt // patch
  x = images.reshape(b, n, patch, n, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = _encoder(x.reshape(b, n * n, patch * patch * c) @ pe + pos, blocks, heads)
  w = x.shape[-1]
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, w // heads)
  q = split(jnp.broadcast_to(head["probe"], (b, 1, w)) @ head["wq"])
  k, v = split(x @ head["wk"]), split(x @ head["wv"])
  att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (w // heads) ** 0.5)
  y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, 1, w) @ head["wo"]
  return (y + jax.nn.gelu(_ln(y) @ head["w1"]) @ head["w2"])[:, 0]


def test_siglips_vit_matches_xla_cost_analysis():
  cfg, b = _tiny_cfg(), 4
  im = cfg.image
  im.update(pool="map", cls_token=False)
  z = lambda *s: jnp.zeros(s, jnp.float32)
  n, w = (im.image_size // im.patch_size) ** 2, im.width
  head = dict(probe=z(1, 1, w), wq=z(w, w), wk=z(w, w), wv=z(w, w), wo=z(w, w), w1=z(w, im.mlp_dim),
              w2=z(im.mlp_dim, w))
  params = (z(im.patch_size ** 2 * 3, w), z(1, n, w), [_block_params(w, im.mlp_dim) for _ in range(im.depth)], head)
  ref = _xla_flops(lambda x, p: _siglip_vit(x, *p, patch=8, heads=2), z(b, 32, 32, 3), params)
  assert b * F.vit_forward_flops(im, 0) == pytest.approx(ref, rel=0.05)


def test_train_step_matches_xla_cost_analysis():
  """Forward + backward of the whole dual encoder with contrastive loss ~ 3x."""
  cfg, b = _tiny_cfg(), 8
  images, tokens, vparams, tparams = _align_inputs(cfg, b)
  grad = jax.grad(lambda vp, tp: _align_forward(images, tokens, vp, tp, cfg),
                  argnums=(0, 1))
  ref = _xla_flops(grad, vparams, tparams)
  got = align_flops.train_flops(cfg, b)
  # XLA also counts the elementwise work (measured ~2 % here).
  assert got == pytest.approx(ref, rel=0.05)


def test_closed_forms():
  # Single matmul convention.
  assert F.matmul_flops(2, 3, 4) == 48
  # Block: 24*S*W^2 (QKV + out + 4x MLP) + 4*S^2*W when mlp_dim = 4W.
  s, w = 10, 8
  assert F.block_forward_flops(s, w, 4 * w) == 24 * s * w * w + 4 * s * s * w
  # depth 0 ViT: patch embedding + projection only.
  img = dict(image_size=16, patch_size=4, width=32, depth=0, num_heads=1,
             mlp_dim=64)
  assert F.vit_forward_flops(img, 8) == 2 * 16 * (4 * 4 * 3) * 32 + 2 * 32 * 8
  assert F.vit_seq_len(img) == 17
  # depth 0 text: projection only (embedding lookup is a gather).
  txt = dict(vocab_size=10, context_length=5, width=32, depth=0, num_heads=1,
             mlp_dim=64)
  assert F.text_forward_flops(txt, 8) == 2 * 32 * 8
  cfg = dict(image=img, text=txt, embed_dim=8)
  # train = 3 x forward; per-example part linear in B, logits quadratic.
  per_ex = F.vit_forward_flops(img, 8) + F.text_forward_flops(txt, 8)
  for b in (1, 7, 128):
    assert align_flops.train_flops(cfg, b) == 3 * (b * per_ex + 2 * b * b * 8)
  assert bench_step.mfu(100.0, 2.0, 100.0) == 0.5


def test_bench_tiny_number():
  """The number quoted in the benchmark report for configs/bench_tiny.py."""
  img = dict(image_size=64, patch_size=8, width=256, depth=4, num_heads=4,
             mlp_dim=1024)
  txt = dict(vocab_size=1024, context_length=32, width=256, depth=4,
             num_heads=4, mlp_dim=1024)
  s_i, s_t, w, m, e, b = 65, 32, 256, 1024, 256, 128
  blk = lambda s: 2 * s * w * 3 * w + 2 * s * w * w + 4 * s * s * w + 4 * s * w * m
  # the pooled last block: keys and values of every token; query, output projection, scores,
  # values and MLP of one
  last = lambda s: 2 * s * w * 2 * w + 2 * w * w * 2 + 4 * s * w + 4 * w * m
  vit = 2 * 64 * 192 * w + 3 * blk(s_i) + last(s_i) + 2 * w * e
  text = 3 * blk(s_t) + last(s_t) + 2 * w * e
  want = 3 * (b * (vit + text) + 2 * b * b * e)
  got = align_flops.train_flops(dict(image=img, text=txt, embed_dim=e), b)
  assert got == want
  assert got == pytest.approx(195.3e9, rel=0.01)  # 245.2e9 with every token through the last blocks


# --- the open_clip comparison helpers (no torch needed) -----------------------

def test_compare_missing_env_says_how_to_create_it(tmp_path, monkeypatch):
  from vlp.bench import compare
  monkeypatch.delenv("VLP_BENCH_PYTHON", raising=False)
  with pytest.raises(compare.ReferenceEnvError, match="setup_bench_env.sh"):
    compare.run_open_clip_reference(_tiny_cfg(), 8, 1, 0,
                                    python=str(tmp_path / "nope" / "python"))
  monkeypatch.setenv("VLP_BENCH_PYTHON", str(tmp_path / "missing"))
  with pytest.raises(compare.ReferenceEnvError, match="missing"):
    compare.bench_python()


def test_compare_side_by_side_and_cfg_json():
  import json
  from vlp.bench import compare
  d = json.loads(compare.model_cfg_json(_tiny_cfg()))
  assert d["image"]["patch_size"] == 8 and d["embed_dim"] == 64
  row = compare.side_by_side(
      dict(examples_per_sec=120.0, step_ms=1000.0),
      dict(examples_per_sec=100.0, step_ms=1200.0, torch_matmul_peak_flops=2e9),
      train_flops_per_step=1e9, jax_peak_flops=1e9 / 0.5)
  assert row["ratio"] == pytest.approx(1.2) and row["goal_met"]
  assert row["vlp_mfu"] == pytest.approx(0.5)
  assert row["open_clip_mfu"] == pytest.approx(1 / 1.2 / 2)
  assert row["open_clip_mfu_own_peak"] == pytest.approx(1 / 1.2 / 2)


def test_open_clip_ref_imports_neither_jax_nor_vlp():
  """It must run in a torch-only environment."""
  import ast
  import pathlib
  from vlp.bench import compare
  tree = ast.parse(pathlib.Path(compare.REF_SCRIPT).read_text())
  mods = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      mods |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      mods.add(node.module.split(".")[0])
  assert not mods & {"jax", "jaxlib", "flax", "optax", "vlp", "ml_collections"}


@pytest.mark.parametrize("variant_name", ["image_text_16px", "image_text_32px", "video_text", "image_class"])
def test_imp_task_flops_match_xla_cost_analysis(variant_name):
  """Every IMP task's analytic training FLOPs against XLA's count of its real gradient."""
  from flax import nnx
  from test_agd import imp_config
  from conftest import build_model, variants_of
  from vlp import recipes
  c = imp_config(**{"model.encoder.width": 128, "model.encoder.mlp_dim": 512, "model.embed_dim": 64})
  v = variants_of(c)[variant_name]
  graphdef, params = nnx.split(build_model(c.model), nnx.Param)
  params = nnx.to_pure_dict(params)
  size, b = v.image_size, v.batch_size
  batch = {"image": jnp.zeros((b, size, size, 3)), "video": jnp.zeros((b, v.frames, size, size, 3)),
           "text": jnp.ones((b, 16), jnp.int32), "label": jnp.zeros((b,), jnp.int32)}
  batch = {k: batch[k] for k in v.spec}
  imp = recipes.get("imp")
  grad = jax.grad(lambda p: imp.loss(graphdef, p, {}, batch, jnp.int32(0), c, v)[0])
  assert imp.train_flops(c, v) == pytest.approx(_xla_flops(grad, params), rel=0.06)
