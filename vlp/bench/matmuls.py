"""`vlp bench matmuls`: the fastest a train step could be if only its matmuls cost time.

Lists every matmul of one dual-encoder train step (forward, and the two
backward matmuls of each: gradient w.r.t. the input and w.r.t. the weight),
times each one alone with JAX on this machine (all cores, compiled, best of a
few runs) and sums them. That sum is a floor on the step time for this
backend's matmul kernels: layer norms, GELU, softmax, the optimizer and every
layout copy come on top. It tells whether a speed goal is reachable at all
before anyone tunes element-wise code.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from vlp.core.config import ConfigError
from vlp.models import flops as flops_lib


@dataclasses.dataclass(frozen=True)
class Matmul:
  """`batch` independent (m x k) @ (k x n) products in the forward pass."""
  name: str
  m: int
  k: int
  n: int
  batch: int = 1
  input_grad: bool = True  # False when the input is data (patch pixels)

  @property
  def forward_flops(self) -> float:
    return self.batch * flops_lib.matmul_flops(self.m, self.n, self.k)


def _layer(prefix, tokens_per_seq, num_seqs, width, heads, mlp_dim, queries_per_seq):
  t, q, d = tokens_per_seq * num_seqs, queries_per_seq * num_seqs, width // heads
  qkv = ([Matmul(f'{prefix}.qkv', t, width, 3 * width)] if q == t else  # else keys and values of every token
         [Matmul(f'{prefix}.qkv', t, width, 2 * width), Matmul(f'{prefix}.qkv', q, width, width)])
  return qkv + [
      Matmul(f'{prefix}.scores', queries_per_seq, d, tokens_per_seq, num_seqs * heads),
      Matmul(f'{prefix}.values', queries_per_seq, tokens_per_seq, d, num_seqs * heads),
      Matmul(f'{prefix}.out', q, width, width),
      Matmul(f'{prefix}.mlp_in', q, width, mlp_dim),
      Matmul(f'{prefix}.mlp_out', q, mlp_dim, width),
  ]


def _tower(prefix, tokens_per_seq, num_seqs, width, depth, heads, mlp_dim, pooled):
  """The tower's layers; `pooled`: its last block runs for the pooled token alone (vlp.models.flops)."""
  layer = lambda queries: _layer(prefix, tokens_per_seq, num_seqs, width, heads, mlp_dim, queries)
  return [] if depth == 0 else layer(tokens_per_seq) * (depth - 1) + layer(1 if pooled else tokens_per_seq)


def step_matmuls(model_cfg, batch_size: int) -> list[Matmul]:
  """Every forward matmul of one ALIGN/SigLIP train step, in FLOP-count order."""
  im, tx, e, b = model_cfg.image, model_cfg.text, model_cfg.embed_dim, batch_size
  patches = (im.image_size // im.patch_size) ** 2
  out = [Matmul('image.patch_embed', b * patches, im.patch_size ** 2 * 3, im.width, input_grad=False)]
  out += _tower('image', flops_lib.vit_seq_len(im), b, im.width, im.depth, im.num_heads, im.mlp_dim,
                pooled=flops_lib.vit_pools_one_token(im))
  out += _tower('text', tx.context_length, b, tx.width, tx.depth, tx.num_heads, tx.mlp_dim, pooled=True)
  out += [Matmul('image.proj', b, im.width, e), Matmul('text.proj', b, tx.width, e),
          Matmul('logits', b, e, b)]
  return out


def _time(fn, shapes, repeats):
  args = [jnp.full(s, 0.01, jnp.float32) for s in shapes]
  fn = jax.jit(fn)
  fn(*args).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn(*args).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best


def time_matmul(mm: Matmul, repeats: int = 5) -> float:
  """Seconds for the forward matmul and its backward matmuls, each run alone."""
  b, m, k, n = mm.batch, mm.m, mm.k, mm.n
  seconds = _time(lambda x, w: jnp.einsum('bmk,bkn->bmn', x, w), [(b, m, k), (b, k, n)], repeats)
  if mm.input_grad:  # dx = g @ w^T
    seconds += _time(lambda g, w: jnp.einsum('bmn,bkn->bmk', g, w), [(b, m, n), (b, k, n)], repeats)
  # dw = x^T @ g
  seconds += _time(lambda x, g: jnp.einsum('bmk,bmn->bkn', x, g), [(b, m, k), (b, m, n)], repeats)
  return seconds


def run(config, repeats: int = 5) -> dict:
  """The matmul-only floor of the step: total ms, examples/s ceiling, per-name ms."""
  if config.tasks or any('width' not in config.model.get(t, {}) for t in ('image', 'text')):
    raise ConfigError(f"config key 'model.name': `vlp bench matmuls` lists the matmuls of a dual encoder's "
                      f"towers (model.image, model.text) on config.data; use `vlp bench step` for "
                      f"{config.model.name!r}")
  mms = step_matmuls(config.model, config.batch_size)
  cache, by_name = {}, {}
  for mm in mms:  # the same shape repeats once per layer: time it once
    key = (mm.m, mm.k, mm.n, mm.batch, mm.input_grad)
    if key not in cache:
      cache[key] = time_matmul(mm, repeats)
    by_name[mm.name] = by_name.get(mm.name, 0.0) + cache[key]
  total = sum(by_name.values())
  return {
      'matmul_only_ms': 1e3 * total,
      'examples_per_sec_ceiling': config.batch_size / total,
      'matmul_gflops_per_sec': sum(mm.forward_flops * (3 if mm.input_grad else 2) for mm in mms) / total / 1e9,
      'ms_by_matmul': {k: round(1e3 * v, 2) for k, v in by_name.items()},
  }
