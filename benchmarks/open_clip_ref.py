"""open_clip (torch; CPU, or one GPU) training-throughput reference for `vlp bench`.

Runs in a SEPARATE python environment that has torch + open_clip_torch (create
it with `bash launch/setup_bench_env.sh`); it imports neither jax nor any vlp
module, so it also runs as a plain file:

  .venv-bench/bin/python benchmarks/open_clip_ref.py \
      --json '{"image": {...}, "text": {...}, "embed_dim": 256}' \
      --batch 128 --steps 10 --warmup 3 [--threads 2] [--device cuda] [--profile]

Builds `open_clip.model.CLIP(embed_dim, vision_cfg=CLIPVisionCfg(...),
text_cfg=CLIPTextCfg(...))` with the vlp architecture (ViT: CLS token, learned
pos emb, pre-LN, GELU; text: causal pooled at [SEP] or bidirectional pooled at [CLS], as the config says; linear
projections without bias), fp32, AdamW (lr 1e-3, wd 0.1, open_clip's
defaults: betas (0.9, 0.98), eps 1e-6, no decay on gains/biases/logit_scale)
and the standard `open_clip.loss.ClipLoss`, trains on one fixed random batch
(images ~ N(0, 1), tokens ~ U[0, vocab)) and prints ONE JSON line:

  {"examples_per_sec", "step_ms", "torch_matmul_peak_flops", "threads",
   "torch_version", "open_clip_version", ...}
(examples_per_sec and step_ms come from the MEDIAN step time of the timed
steps, as in `vlp bench step`: robust to a noisy neighbour; *_mean too.)

Known architecture differences from vlp (small, and in open_clip's favour or
neutral): open_clip's text tower has no padding mask in CLIP (vlp masks PAD=0),
its ViT has an extra LayerNorm before the encoder (ln_pre).

`open_clip/__init__.py` imports torchvision (for image transforms) and
`open_clip/utils.py` imports `torchvision.ops.misc.FrozenBatchNorm2d` (only
used to freeze ResNet batch norms). When torchvision is not importable (the
cheap env: CPU torch from disk, open_clip_torch --no-deps), the unmodified
`open_clip.model` / `open_clip.transformer` / `open_clip.loss` modules are
loaded without running the package `__init__`, with a stub for that one
torchvision symbol; the JSON says which path was used ("open_clip_import").

--device cuda: model, batch and AdamW on the first GPU, the times taken after a
torch.cuda.synchronize, peak_memory_gib from torch.cuda.max_memory_allocated.
A config with dtype 'bfloat16' trains under torch.autocast(bfloat16) with fp32
params (open_clip's --precision amp_bf16), on either device. Attention is
torch's scaled_dot_product_attention either way: open_clip's default block is
nn.MultiheadAttention, called with need_weights=False, which takes that path.
--profile: the timed steps run under torch.profiler; 'profile' lists each
operator's self CPU and self device time per step, and whether it ran inside
the optimizer's step or inside scaled_dot_product_attention.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import types


def _stub_torchvision():
  """Just enough of torchvision for `open_clip.utils` to import."""
  import torch

  class FrozenBatchNorm2d(torch.nn.Module):  # pragma: no cover - never used for ViTs
    def __init__(self, *a, **k):
      raise RuntimeError("torchvision is not installed (stubbed by vlp open_clip_ref)")

  tv = types.ModuleType("torchvision")
  ops = types.ModuleType("torchvision.ops")
  misc = types.ModuleType("torchvision.ops.misc")
  misc.FrozenBatchNorm2d = FrozenBatchNorm2d
  tv.ops, ops.misc = ops, misc
  tv.__path__ = ops.__path__ = []  # make them packages
  sys.modules.update({"torchvision": tv, "torchvision.ops": ops,
                      "torchvision.ops.misc": misc})


def import_open_clip():
  """Returns (namespace with CLIP, CLIPVisionCfg, CLIPTextCfg, ClipLoss, version, how)."""
  try:
    import open_clip  # the whole package (needs a working torchvision)
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    how = "full"
    version = open_clip.__version__
  except Exception as e:  # noqa: BLE001 - ImportError or torchvision's RuntimeError
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
      del sys.modules[name]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
      raise ImportError(
          "open_clip is not installed in this environment "
          f"({sys.executable}); create it with `bash launch/setup_bench_env.sh`"
      ) from e
    try:
      import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001
      for name in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[name]
      _stub_torchvision()
      # open_clip's optional HF text towers import transformers, whose package probe trips
      # over the stub (torchvision.__spec__ is None); the CLIP towers need neither
      if "transformers" not in sys.modules:
        sys.modules["transformers"] = None
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    pkg.__package__ = "open_clip"
    sys.modules["open_clip"] = pkg
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.version import __version__ as version
    how = f"model+loss only ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
  return types.SimpleNamespace(CLIP=CLIP, CLIPVisionCfg=CLIPVisionCfg,
                               CLIPTextCfg=CLIPTextCfg, ClipLoss=ClipLoss,
                               version=version, how=how)


# vlp image pooling -> open_clip VisionTransformer pool_type (both prepend a CLS token).
_IMAGE_POOL = {"cls": "tok", "tok": "tok", "gap": "avg", "avg": "avg"}


def build_model(oc, cfg: dict):
  """open_clip CLIP with the vlp architecture described by `cfg` (model cfg dict)."""
  im, tx, e = cfg["image"], cfg["text"], int(cfg["embed_dim"])
  assert im["width"] % im["num_heads"] == 0 and tx["width"] % tx["num_heads"] == 0
  causal = bool(tx.get("causal", False))
  vision_cfg = oc.CLIPVisionCfg(
      layers=im["depth"], width=im["width"],
      head_width=im["width"] // im["num_heads"],
      mlp_ratio=im["mlp_dim"] / im["width"],
      patch_size=im["patch_size"], image_size=im["image_size"],
      pool_type=_IMAGE_POOL[im.get("pool", "cls")], pos_embed_type="learnable")
  text_cfg = oc.CLIPTextCfg(
      context_length=tx["context_length"], vocab_size=tx["vocab_size"],
      width=tx["width"], heads=tx["num_heads"], layers=tx["depth"],
      mlp_ratio=tx["mlp_dim"] / tx["width"],
      no_causal_mask=not causal,
      # vlp's 'eos' pools at [SEP] (id 3 in vlp's tokenizer), CLIP's EOT
      pool_type={"cls": "first", "eos": "eos"}.get(tx.get("pool", "cls"), "first"), eos_id=3,
      proj_bias=False, proj_type="linear")
  model = oc.CLIP(e, vision_cfg=vision_cfg, text_cfg=text_cfg,
                  quick_gelu=False, cast_dtype=None, output_dict=True)
  return model


def make_optimizer(model, lr: float, wd: float):
  """As open_clip's training/main.py: no weight decay on gains, biases, logit_scale."""
  import torch
  exclude = lambda n, p: (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                          or "logit_scale" in n)
  named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  decay = [p for n, p in named if not exclude(n, p)]
  no_decay = [p for n, p in named if exclude(n, p)]
  return torch.optim.AdamW(
      [{"params": no_decay, "weight_decay": 0.0},
       {"params": decay, "weight_decay": wd}],
      lr=lr, betas=(0.9, 0.98), eps=1e-6)


def measure_torch_matmul_peak(n: int = 2048, repeats: int = 5, chain: int = 4,
                              device: str = "cpu", dtype=None) -> float:
  """Best FLOP/s of `chain` chained (n x n) matmuls (same recipe as vlp.bench.peak); fp32 on
  the CPU unless `dtype`."""
  import torch
  g = torch.Generator().manual_seed(0)
  a = (torch.randn(n, n, generator=g) / n ** 0.5).to(device, dtype)
  b = torch.randn(n, n, generator=g).to(device, dtype)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  def run():
    x = b
    for _ in range(chain):
      x = a @ x
    return x
  with torch.no_grad():
    run()
    sync()
    best = math.inf
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      run()
      sync()
      best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 * chain / best


def _scope(evt) -> str:
  """'optimizer' for an operator inside the optimizer's step, 'attention' for one inside
  scaled_dot_product_attention (forward or backward), '' otherwise."""
  while evt is not None:
    if evt.name.startswith("Optimizer.step#"):  # torch's own record_function of every step()
      return "optimizer"
    if "scaled_dot_product" in evt.name or "ScaledDotProduct" in evt.name:
      return "attention"
    evt = evt.cpu_parent
  return ""


def profile_ops(events, steps: int) -> list:
  """[[operator, scope, self CPU ms, self device ms], ...] per step, from torch.profiler's
  events (CPU-side operators; their kernels' time is their self device time)."""
  from torch.autograd import DeviceType
  totals = {}
  for evt in events:
    if evt.device_type != DeviceType.CPU:
      continue
    key = (evt.name, _scope(evt))
    cpu, dev = totals.get(key, (0.0, 0.0))
    totals[key] = (cpu + evt.self_cpu_time_total, dev + evt.self_device_time_total)
  rows = [[n, sc, cpu / 1e3 / steps, dev / 1e3 / steps] for (n, sc), (cpu, dev) in totals.items()]
  return sorted(rows, key=lambda r: -max(r[2], r[3]))


def _timed(step, steps: int, warmup: int, sync, profile: bool, device: str):
  """(step seconds, losses, per-operator profile or None): `warmup` steps, then `steps`
  timed one by one (under torch.profiler with `profile`)."""
  import contextlib
  import torch
  losses = [float(step().detach()) for _ in range(warmup)]
  activities = [torch.profiler.ProfilerActivity.CPU] + (
      [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
  prof = torch.profiler.profile(activities=activities) if profile else contextlib.nullcontext()
  times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  with prof:
    for _ in range(steps):
      t0 = time.perf_counter()
      loss = step()
      sync()
      times.append(time.perf_counter() - t0)
      losses.append(float(loss.detach()))
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
  ops = dict(steps=steps, device=device, ops=profile_ops(prof.events(), steps)) if profile else None
  return times, losses, ops, faults


def run(cfg: dict, batch: int, steps: int, warmup: int, threads: int,
        lr: float = 1e-3, wd: float = 0.1, peak: bool = True, seed: int = 0,
        device: str = "cpu", profile: bool = False) -> dict:
  """device='cuda': the model, batch and optimizer on the (first) GPU; a bfloat16 config
  trains under torch.autocast(bf16) with fp32 params, as open_clip's --precision amp_bf16
  (on the CPU too). profile: the timed steps under torch.profiler."""
  import contextlib
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  dtype = cfg.get("dtype", "float32")
  if dtype not in ("float32", "fp32", "bfloat16"):
    raise ValueError(f"open_clip reference runs float32 or bfloat16 (amp), got dtype={dtype!r}")
  amp = dtype == "bfloat16"
  oc = import_open_clip()
  model = build_model(oc, cfg).to(device)
  model.train()
  opt = make_optimizer(model, lr, wd)
  loss_fn = oc.ClipLoss()
  im, tx = cfg["image"], cfg["text"]
  images = torch.randn(batch, 3, im["image_size"], im["image_size"]).to(device)
  tokens = torch.randint(0, tx["vocab_size"], (batch, tx["context_length"])).to(device)
  autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def step():
    with autocast():
      out = model(images, tokens)
      loss = loss_fn(**out)  # as open_clip's training loop: ClipLoss(**model_out)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    return loss

  times, losses, ops, faults = _timed(step, steps, warmup, sync, profile, device)
  median, mean = statistics.median(times), sum(times) / len(times)
  peak_dtype = torch.bfloat16 if amp and device == "cuda" else None
  result = dict(
      examples_per_sec=batch / median,
      step_ms=1e3 * median,
      examples_per_sec_mean=batch / mean,
      step_ms_mean=1e3 * mean,
      step_ms_min=1e3 * min(times),
      page_faults_per_step=faults,  # host memory mapped in again each step (vlp.core.host_memory)
      malloc_settings={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
      torch_matmul_peak_flops=measure_torch_matmul_peak(
          n=8192 if device == "cuda" else 2048, device=device, dtype=peak_dtype) if peak else None,
      threads=torch.get_num_threads(),
      torch_version=torch.__version__,
      open_clip_version=oc.version,
      open_clip_import=oc.how,
      batch_size=batch, steps=len(times), warmup=warmup,
      num_params=sum(p.numel() for p in model.parameters()),
      loss_first=losses[0], loss_last=losses[-1],
      python=platform.python_version(),
  )
  if device != "cpu" or amp or profile:  # the CPU fp32 result keeps its keys
    result.update(device=device, amp="bf16" if amp else None, profile=ops,
                  peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None,
                  gpu=torch.cuda.get_device_name() if device == "cuda" else None)
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", required=True,
                 help="model cfg as JSON: {image: {...}, text: {...}, embed_dim}")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--wd", type=float, default=0.1)
  p.add_argument("--no-peak", action="store_true", help="skip the matmul peak")
  p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
  p.add_argument("--profile", action="store_true",
                 help="the timed steps under torch.profiler: per-operator self times in 'profile'")
  a = p.parse_args(argv)
  cfg = json.loads(a.json)
  res = run(cfg, a.batch, a.steps, a.warmup, a.threads, a.lr, a.wd,
            peak=not a.no_peak, device=a.device, profile=a.profile)
  print(json.dumps(res), flush=True)


if __name__ == "__main__":
  main()
