"""open_clip (torch, CPU) side of `vlp bench quality`: trains open_clip's CLIP on the
examples vlp trained on, in the same order, and writes its embeddings of the held-out set.

Runs in the torch + open_clip environment (`bash launch/setup_bench_env.sh`), imports
neither jax nor vlp, and is started by vlp.bench.quality:

  .venv-bench/bin/python -I benchmarks/open_clip_train_ref.py --data D.npz --setup S.json --out E.npz

D.npz: train_image uint8 [N, H, W, 3], train_text int32 [N, L] (N = steps x batch, in
vlp's order), eval_image uint8 [M, H, W, 3], eval_text int32 [K, L]. Pixels are mapped
as vlp maps them, (x - 127.5) / 127.5; the tokens are vlp's, so the text tower pools at
vlp's [SEP] id (CLIP's EOT). S.json: the architecture (vlp's model config), the head, the
optimizer and the seed. The training step is open_clip_train's `train_one_epoch` without
its distributed parts: `cosine_lr` from open_clip_train.scheduler, AdamW with open_clip's
parameter groups, the loss on the model's output dict, global-norm clipping, and the
logit scale clamped to log(100).

Prints one JSON line: {"final_logit_scale", "final_logit_bias", "loss_first", "loss_last",
"train_seconds", "torch_version", "open_clip_version"}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import open_clip_ref  # noqa: E402 - the sibling file (no vlp package in this environment)


def build_clip(oc, setup: dict):
  """open_clip's CLIP at vlp's sizes, as open_clip builds it (ln_pre, causal text pooled at EOT,
  its own init); SigLIP's head: temperature 10 and bias -10 as open_clip's siglip configs."""
  m = setup["model"]
  im, tx = m["image"], m["text"]
  vision = oc.CLIPVisionCfg(layers=im["depth"], width=im["width"], head_width=im["width"] // im["num_heads"],
                            mlp_ratio=im["mlp_dim"] / im["width"], patch_size=im["patch_size"],
                            image_size=im["image_size"])
  text = oc.CLIPTextCfg(context_length=tx["context_length"], vocab_size=tx["vocab_size"], width=tx["width"],
                        heads=tx["num_heads"], layers=tx["depth"], mlp_ratio=tx["mlp_dim"] / tx["width"],
                        pad_id=setup["pad_id"], eos_id=setup["sep_id"], pool_type="eos")
  extra = {}
  if m["head"] == "sigmoid":
    extra = dict(init_logit_scale=math.log(10), init_logit_bias=-10)
  return oc.CLIP(m["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=False, output_dict=True, **extra)


def cosine_lr(optimizer, base_lr: float, warmup: int, steps: int):
  """open_clip_train.scheduler.cosine_lr (imported when the package is there, else the same formula)."""
  try:
    from open_clip_train.scheduler import cosine_lr as theirs
    return theirs(optimizer, base_lr, warmup, steps)
  except ImportError:
    def adjust(step):
      if step < warmup:
        lr = base_lr * (step + 1) / warmup
      else:
        e, es = step - warmup, steps - warmup
        lr = 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr
      for group in optimizer.param_groups:
        group["lr"] = lr
      return lr
    return adjust


def loss_of(oc_loss_module, head: str):
  if head == "sigmoid":
    return oc_loss_module.SigLipLoss()
  return oc_loss_module.ClipLoss()


def pixels(torch, images):
  x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
  return (x - 127.5) / 127.5


def train(setup: dict, data, threads: int) -> tuple:
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(setup["seed"])
  oc = open_clip_ref.import_open_clip()
  from open_clip import loss as oc_loss  # after import_open_clip: it may register the package itself
  model = build_clip(oc, setup)
  model.train()
  o = setup["optim"]
  optimizer = open_clip_ref.make_optimizer(model, o["lr"], o["weight_decay"])
  for group in optimizer.param_groups:  # make_optimizer has open_clip's defaults; the run's own here
    group.update(betas=(o["b1"], o["b2"]), eps=o["eps"])
  steps, batch = setup["steps"], setup["batch_size"]
  scheduler = cosine_lr(optimizer, o["lr"], o["warmup_steps"], steps)
  loss_fn = loss_of(oc_loss, setup["model"]["head"])
  images, texts = data["train_image"], data["train_text"]
  losses, t0 = [], time.perf_counter()
  for step in range(steps):
    scheduler(step)
    rows = slice(step * batch, (step + 1) * batch)
    out = model(pixels(torch, images[rows]), torch.from_numpy(texts[rows]).long())
    optimizer.zero_grad()
    loss = loss_fn(**out)
    loss.backward()
    if o["clip_norm"]:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"], norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    losses.append(float(loss.detach()))
  return model, losses, time.perf_counter() - t0, oc


def embed(model, data, batch: int = 256):
  import numpy as np
  import torch
  model.eval()
  out = {}
  with torch.no_grad():
    for key, fn, prep in (("image", model.encode_image, lambda x: pixels(torch, x)),
                          ("text", model.encode_text, lambda x: torch.from_numpy(x).long())):
      xs = data[f"eval_{key}"]
      chunks = [fn(prep(xs[i:i + batch]), normalize=True).numpy() for i in range(0, len(xs), batch)]
      out[f"{key}_emb"] = np.concatenate(chunks).astype(np.float32)
  return out


def main(argv=None):
  import numpy as np
  import torch
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True)
  p.add_argument("--setup", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  args = p.parse_args(argv)
  with open(args.setup) as f:
    setup = json.load(f)
  data = dict(np.load(args.data))
  model, losses, seconds, oc = train(setup, data, args.threads)
  np.savez(args.out, **embed(model, data))
  bias = getattr(model, "logit_bias", None)
  print(json.dumps(dict(final_logit_scale=float(model.logit_scale.exp()),
                        final_logit_bias=None if bias is None else float(bias),
                        loss_first=losses[0], loss_last=losses[-1], train_seconds=seconds,
                        torch_version=torch.__version__, open_clip_version=oc.version)))


if __name__ == "__main__":
  main()
