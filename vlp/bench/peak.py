"""Measured matmul peak of the default JAX backend (the denominator of MFU).

MFU in vlp is `analytic model FLOP/s / measure_matmul_peak()`: the peak is the
best FLOP/s of a large square matmul *measured on the same machine with JAX*,
not a datasheet number. This makes MFU meaningful on CPUs (where datasheet
peaks depend on SIMD width, turbo, and how many cores the process really gets)
and comparable with the torch reference, which measures its own peak the same
way (`benchmarks/open_clip_ref.py:measure_torch_matmul_peak`). Both numbers are
reported side by side by `vlp/bench/compare.py`. On a GPU listed in GPU_PEAK_BF16 `vlp bench
step` takes the datasheet's bf16 dense peak instead (`step_peak`): a GPU's matmul peak depends on
dtype, size and clocks, and the datasheet is what MFU is quoted against there.

    from vlp.bench.peak import measure_matmul_peak
    peak = measure_matmul_peak()          # FLOP/s, fp32, default backend
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# bf16 dense tensor-core FLOP/s of one GPU, by a substring of its JAX device_kind (first match
# wins). NVIDIA's datasheets give the figure with 2:4 structured sparsity; dense is half of it:
#   "NVIDIA H100 Tensor Core GPU" datasheet: BF16 Tensor Core 1,979 TFLOPS (H100 SXM), 1,671 (H100
#     NVL), 1,513 (H100 PCIe), with sparsity -> 989, 835, 756 dense;
#   "NVIDIA H200 Tensor Core GPU" datasheet: BF16 Tensor Core 1,979 TFLOPS (H200 SXM), 1,671 (H200
#     NVL), with sparsity -> 989, 835 dense (the H100's compute; more and faster memory);
#   "NVIDIA A100 Tensor Core GPU" datasheet: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity).
GPU_PEAK_BF16 = (
    ('H200 NVL', 835e12, 'NVIDIA H200 datasheet (NVL), bf16 dense'),
    ('H200', 989e12, 'NVIDIA H200 datasheet (SXM), bf16 dense'),
    ('H100 NVL', 835e12, 'NVIDIA H100 datasheet (NVL), bf16 dense'),
    ('H100 PCIe', 756e12, 'NVIDIA H100 datasheet (PCIe), bf16 dense'),
    ('H100', 989e12, 'NVIDIA H100 datasheet (SXM), bf16 dense'),
    ('A100', 312e12, 'NVIDIA A100 datasheet, bf16 dense'),
)


def datasheet_peak(device_kind: str):
  """(bf16 dense FLOP/s, source) of a GPU by its device_kind ('NVIDIA H100 80GB HBM3'), or None."""
  for key, flops, source in GPU_PEAK_BF16:
    if key.lower() in device_kind.lower():
      return flops, source
  return None


def step_peak() -> tuple[float, str]:
  """(peak FLOP/s of all devices together, where it comes from), MFU's denominator for `vlp bench
  step`: a GPU's datasheet bf16 peak (GPU_PEAK_BF16) times the devices; otherwise the matmul peak
  measured here (simulated CPU devices share the host's cores: the host's peak is the peak)."""
  devices = jax.devices()
  if jax.default_backend() == 'gpu':
    sheet = datasheet_peak(devices[0].device_kind)
    if sheet:
      return sheet[0] * len(devices), f'{sheet[1]} x {len(devices)} ({devices[0].device_kind})'
  per_host = jax.default_backend() == 'cpu'
  return measure_matmul_peak() * (1 if per_host else len(devices)), 'measured fp32 matmul peak (vlp.bench.peak)'


# Square size per backend: big enough to be compute-bound, small enough to
# measure in a few seconds on a 2-core CPU.
_DEFAULT_N = {"cpu": 2048}
_DEFAULT_N_ACCEL = 8192


def default_size(backend: str | None = None) -> int:
  backend = backend or jax.default_backend()
  return _DEFAULT_N.get(backend, _DEFAULT_N_ACCEL)


@functools.partial(jax.jit, static_argnames=("chain", "precision"))
def _matmul_chain(a, b, chain: int, precision=None):
  """`chain` dependent matmuls b <- a @ b inside one program (amortises dispatch).

  `a` is scaled by 1/sqrt(n) at creation so values stay O(1) along the chain
  (no inf/nan or denormal slow paths).
  """
  def body(_, x):
    return jnp.matmul(a, x, precision=precision)
  return jax.lax.fori_loop(0, chain, body, b)


def measure_matmul_peak(dtype=jnp.float32, n: int | None = None,
                        repeats: int = 5, chain: int = 4,
                        precision=None, return_details: bool = False):
  """Best-of-`repeats` FLOP/s of `chain` chained (n x n) @ (n x n) matmuls.

  Counts 2*n^3 FLOPs per matmul. The program is compiled and run once before
  timing; every timed run ends with `block_until_ready`. With
  `return_details=True` returns a dict (flops_per_sec, n, chain, repeats,
  dtype, backend, times_s) instead of the float.
  """
  n = n or default_size()
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = (jax.random.normal(ka, (n, n), jnp.float32) / n ** 0.5).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  fn = functools.partial(_matmul_chain, chain=chain, precision=precision)
  fn(a, b).block_until_ready()  # compile + warm up
  times = []
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    fn(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  flops = 2.0 * n ** 3 * chain
  peak = flops / min(times)
  if return_details:
    return dict(flops_per_sec=peak, n=n, chain=chain, repeats=repeats,
                dtype=jnp.dtype(dtype).name, backend=jax.default_backend(),
                times_s=times)
  return peak


if __name__ == "__main__":
  import json
  d = measure_matmul_peak(return_details=True)
  d["gflops_per_sec"] = d["flops_per_sec"] / 1e9
  print(json.dumps(d))
