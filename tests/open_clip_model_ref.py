"""Runs in the open_clip environment (launch/setup_bench_env.sh), not vlp's: builds a small open_clip
CLIP with random weights on the spot, writes it as an open_clip hub directory (its config, the state
dict as .npz for the test to store as safetensors) and its embeddings of the given inputs.

  python tests/open_clip_model_ref.py --config CFG.json --inputs IN.npz --out DIR
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks'))
import open_clip_ref  # noqa: E402 - imports open_clip without torchvision where needed


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--config', required=True)
  ap.add_argument('--inputs', required=True)
  ap.add_argument('--out', required=True)
  args = ap.parse_args()
  import torch
  oc = open_clip_ref.import_open_clip()
  with open(args.config) as f:
    cfg = json.load(f)
  torch.manual_seed(0)
  model = oc.CLIP(cfg['embed_dim'], vision_cfg=cfg['vision_cfg'], text_cfg=cfg['text_cfg'],
                  quick_gelu=cfg.get('quick_gelu', False), output_dict=True).eval()
  with torch.no_grad():  # every weight away from its init (LayerNorm gains off 1, biases off 0)
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  os.makedirs(args.out, exist_ok=True)
  np.savez(os.path.join(args.out, 'state_dict.npz'), **{k: v.numpy() for k, v in model.state_dict().items()
                                                         if k != 'attn_mask' and not k.endswith('.attn_mask')})
  with open(os.path.join(args.out, 'open_clip_config.json'), 'w') as f:
    json.dump({'model_cfg': cfg, 'preprocess_cfg': {'mean': [0.5, 0.4, 0.3], 'std': [0.2, 0.25, 0.3]}}, f)
  inputs = np.load(args.inputs)
  with torch.no_grad():
    image = model.encode_image(torch.from_numpy(inputs['image_nchw']), normalize=True).numpy()
    text = model.encode_text(torch.from_numpy(inputs['tokens']).long(), normalize=True).numpy()
  np.savez(os.path.join(args.out, 'embeddings.npz'), image=image, text=text,
           logit_scale=model.logit_scale.detach().numpy())
  print(json.dumps({'open_clip': getattr(oc, 'version', '?')}))


if __name__ == '__main__':
  main()
