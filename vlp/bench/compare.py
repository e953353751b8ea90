"""Side-by-side comparison of `vlp bench step` with open_clip (torch, CPU).

The open_clip reference runs in its own python environment (torch and jax in
one process would fight over threads and memory, and the project venv has no
torch): `benchmarks/open_clip_ref.py` is started as a subprocess with the
interpreter of that environment, found in this order:
  1. the `python=` argument,
  2. `$VLP_BENCH_PYTHON`,
  3. `<repo root>/.venv-bench/bin/python` (made by `bash launch/setup_bench_env.sh`).

    from vlp.bench import compare
    ref = compare.run_open_clip_reference(config.model, config.batch_size,
                                          steps=10, warmup=3)
    row = compare.side_by_side(vlp_result, ref, train_flops, jax_peak)
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The torch scripts live beside the package, not in it (vlp never imports torch): a checkout's
# benchmarks/ folder, or $VLP_BENCHMARKS.
BENCHMARKS = pathlib.Path(os.environ.get("VLP_BENCHMARKS") or REPO_ROOT / "benchmarks")
REF_SCRIPT = BENCHMARKS / "open_clip_ref.py"
SETUP_HINT = ("create it with `bash launch/setup_bench_env.sh` (makes "
              f"{REPO_ROOT / '.venv-bench'}), or point $VLP_BENCH_PYTHON at a "
              "python that has torch and open_clip_torch")


class ReferenceEnvError(RuntimeError):
  """The torch/open_clip environment is missing or broken."""


def bench_python(python: str | os.PathLike | None = None) -> str:
  """Path of the interpreter of the torch + open_clip environment."""
  cand = python or os.environ.get("VLP_BENCH_PYTHON") or (
      REPO_ROOT / ".venv-bench" / "bin" / "python")
  cand = pathlib.Path(cand)
  if not cand.exists():
    raise ReferenceEnvError(
        f"open_clip reference environment not found: {cand} does not exist; "
        + SETUP_HINT)
  return str(cand)


def _to_plain(cfg: Any) -> Any:
  """ConfigDict / FrozenConfigDict / dict -> JSON-able dict."""
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  if isinstance(cfg, dict):
    return {k: _to_plain(v) for k, v in cfg.items()}
  if isinstance(cfg, (list, tuple)):
    return [_to_plain(v) for v in cfg]
  return cfg


def model_cfg_json(model_cfg: Any) -> str:
  d = _to_plain(model_cfg)
  keep = {k: d[k] for k in ("image", "text", "embed_dim", "dtype") if k in d}
  return json.dumps(keep, sort_keys=True)


def reference_device() -> str:
  """'cuda' where JAX runs on GPUs, else 'cpu': where the reference runs (one GPU: the
  first visible). Before JAX starts, it is told not to preallocate most of a GPU's memory
  (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set): the reference runs first and needs it."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  return "cuda" if jax.default_backend() == "gpu" else "cpu"


def run_open_clip_reference(model_cfg: Any, batch_size: int, steps: int = 10,
                            warmup: int = 3, python: str | None = None,
                            threads: int | None = None,
                            timeout: float | None = 3600.0,
                            extra_args: tuple[str, ...] = (),
                            device: str = "cpu", profile: bool = False) -> dict:
  """Trains open_clip's CLIP with the same architecture in a subprocess.

  Returns the reference's JSON dict (examples_per_sec, step_ms,
  torch_matmul_peak_flops, threads, torch_version, open_clip_version, ...).
  device='cuda': on the GPU, bf16 configs under torch.autocast (peak_memory_gib
  too); profile: the timed steps under torch.profiler ('profile': per-operator
  times, vlp.bench.op_profile.torch_breakdown).
  Raises ReferenceEnvError when the environment is missing or cannot import
  torch / open_clip, RuntimeError for any other failure of the subprocess.
  """
  exe = bench_python(python)
  # -I: isolated (no script dir / PYTHON* vars / user site on sys.path), so
  # neither vlp's modules nor the project venv's packages leak in.
  cmd = [exe, "-I", str(REF_SCRIPT), "--json", model_cfg_json(model_cfg),
         "--batch", str(batch_size), "--steps", str(steps),
         "--warmup", str(warmup),
         "--threads", str(threads or os.cpu_count() or 1), *extra_args,
         *(["--device", device] if device != "cpu" else []),
         *(["--profile"] if profile else [])]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        cwd=str(REPO_ROOT))
  if proc.returncode != 0:
    err = proc.stderr.strip()
    tail = "\n".join(err.splitlines()[-15:])
    if ("No module named 'torch'" in err or "open_clip is not installed" in err
        or "No module named 'numpy'" in err):
      raise ReferenceEnvError(
          f"{exe} cannot run the open_clip reference:\n{tail}\n" + SETUP_HINT)
    raise RuntimeError(
        f"open_clip reference failed (exit {proc.returncode}): "
        f"{' '.join(cmd[:3])} ...\n{tail}")
  for line in reversed(proc.stdout.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"open_clip reference printed no JSON line:\n{proc.stdout}")


def side_by_side(vlp: dict, ref: dict, train_flops_per_step: float,
                 jax_peak_flops: float, goal: float = 1.2) -> dict:
  """One flat dict: both throughputs, the ratio, and MFUs against both peaks.

  `vlp` needs `examples_per_sec` and `step_ms` (from `vlp bench step`);
  `ref` is the dict of `run_open_clip_reference`. MFU uses the JAX-measured
  peak (`vlp.bench.peak.measure_matmul_peak`) for both sides (the common
  peak); open_clip's MFU against torch's own matmul peak and both against the
  larger of the two peaks (the most conservative) are reported too.
  """
  def _mfu(step_ms, peak):
    return train_flops_per_step / (step_ms / 1e3) / peak if peak else None
  torch_peak = ref.get("torch_matmul_peak_flops")
  ratio = vlp["examples_per_sec"] / ref["examples_per_sec"]
  return dict(
      vlp_examples_per_sec=vlp["examples_per_sec"],
      open_clip_examples_per_sec=ref["examples_per_sec"],
      ratio=ratio, goal=goal, goal_met=ratio >= goal,
      vlp_step_ms=vlp["step_ms"], open_clip_step_ms=ref["step_ms"],
      train_gflops_per_step=train_flops_per_step / 1e9,
      jax_matmul_peak_gflops=jax_peak_flops / 1e9,
      torch_matmul_peak_gflops=torch_peak / 1e9 if torch_peak else None,
      vlp_mfu=_mfu(vlp["step_ms"], jax_peak_flops),
      open_clip_mfu=_mfu(ref["step_ms"], jax_peak_flops),
      open_clip_mfu_own_peak=_mfu(ref["step_ms"], torch_peak),
      vlp_mfu_max_peak=_mfu(vlp["step_ms"], max(jax_peak_flops, torch_peak or 0)),
      open_clip_mfu_max_peak=_mfu(ref["step_ms"],
                                  max(jax_peak_flops, torch_peak or 0)),
      threads=ref.get("threads"), torch_version=ref.get("torch_version"),
      open_clip_version=ref.get("open_clip_version"),
      vlp_peak_memory_gib=vlp.get("peak_memory_gib"),
      open_clip_peak_memory_gib=ref.get("peak_memory_gib"),
      open_clip_device=ref.get("device", "cpu"), open_clip_amp=ref.get("amp"),
      vlp_page_faults_per_step=vlp.get("page_faults_per_step"),
      open_clip_page_faults_per_step=ref.get("page_faults_per_step"),
      malloc_settings=ref.get("malloc_settings"),  # both sides run under the same (vlp.core.host_memory)
  )


def format_side_by_side(row: dict) -> str:
  """examples/s, step ms, MFU (against the common peak) and peak memory of both, as a table."""
  def mem(gib):
    return f"{gib:.1f}" if gib is not None else "-"
  lines = [f"{'':<10}{'examples/s':>12}{'step ms':>10}{'MFU':>7}{'peak GiB':>10}"]
  for who in ("vlp", "open_clip"):
    lines.append(f"{who:<10}{row[who + '_examples_per_sec']:>12.1f}{row[who + '_step_ms']:>10.1f}"
                 f"{row[who + '_mfu']:>7.3f}{mem(row[who + '_peak_memory_gib']):>10}")
  lines.append(f"vlp / open_clip: {row['ratio']:.2f}x (goal {row['goal']}x)")
  return "\n".join(lines)
