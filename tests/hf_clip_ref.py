"""Runs in the open_clip environment with transformers (launch/setup_bench_env.sh), not vlp's:

  python tests/hf_clip_ref.py build --config CFG.json --inputs IN.npz --out DIR   # a random CLIPModel, saved
  python tests/hf_clip_ref.py embed --inputs IN.npz --out DIR                     # CLIPModel.from_pretrained(DIR)
Both write DIR/embeddings.npz: the normalised image and text embeddings of the inputs.
"""
import argparse
import json
import os

import numpy as np


def _embed(model, inputs, out):
  import torch
  ids = torch.from_numpy(inputs['tokens']).long()
  with torch.no_grad():
    o = model(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.from_numpy(inputs['image_nchw']))
  np.savez(os.path.join(out, 'embeddings.npz'), image=o.image_embeds.numpy(), text=o.text_embeds.numpy())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('mode', choices=('build', 'embed'))
  ap.add_argument('--config')
  ap.add_argument('--inputs', required=True)
  ap.add_argument('--out', required=True)
  args = ap.parse_args()
  import torch
  from transformers import CLIPConfig, CLIPModel
  inputs = np.load(args.inputs)
  if args.mode == 'build':
    with open(args.config) as f:
      cfg = CLIPConfig(**json.load(f))
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # every weight away from its init (LayerNorm gains off 1, biases off 0)
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(args.out)  # config.json + model.safetensors
  else:
    model = CLIPModel.from_pretrained(args.out).eval()
  _embed(model, inputs, args.out)
  print(json.dumps({'ok': True}))


if __name__ == '__main__':
  main()
