"""Runs in the open_clip environment with transformers (launch/setup_bench_env.sh), not vlp's:

  python tests/hf_clip_ref.py build --config CFG.json --inputs IN.npz --out DIR   # a random CLIPModel, saved
  python tests/hf_clip_ref.py embed --inputs IN.npz --out DIR                     # CLIPModel.from_pretrained(DIR)
Both write DIR/embeddings.npz: the normalised image and text embeddings of the inputs.
`--model=siglip`: a SiglipModel instead, run as SigLIP is, its captions without an attention mask.
`--texts=T.json` (embed): captions tokenised by DIR/tokenizer.json with transformers, not the inputs' ids
(by SiglipTokenizer where DIR has a spiece.model).
`--spiece=SP.model` (build): a SiglipTokenizer of that SentencePiece model, saved in DIR.
"""
import argparse
import json
import os

import numpy as np


def _tokenize(out, texts, length):
  """transformers' own tokenisation of captions with DIR's tokenizer.json (or SiglipTokenizer of
  its spiece.model): its special tokens, truncated to `length` and padded with its pad token."""
  from transformers import PreTrainedTokenizerFast, SiglipTokenizer
  if os.path.exists(os.path.join(out, 'spiece.model')):
    tok = SiglipTokenizer.from_pretrained(out)
  else:
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, 'tokenizer.json'), pad_token='<pad>')
  return np.asarray(tok(texts, padding='max_length', max_length=length, truncation=True)['input_ids'], np.int64)


def _embed(model, inputs, out, siglip, texts=None):
  import torch
  tokens = inputs['tokens'] if texts is None else _tokenize(out, texts, inputs['tokens'].shape[1])
  ids = torch.from_numpy(tokens).long()
  mask = {} if siglip else {'attention_mask': (ids != 0).long()}
  with torch.no_grad():
    o = model(input_ids=ids, pixel_values=torch.from_numpy(inputs['image_nchw']), **mask)
  extra = {'logit_bias': model.logit_bias.detach().numpy()[0]} if siglip else {}
  np.savez(os.path.join(out, 'embeddings.npz'), image=o.image_embeds.numpy(), text=o.text_embeds.numpy(), tokens=tokens,
           logits=o.logits_per_image.numpy(), logit_scale=model.logit_scale.detach().exp().numpy().reshape(()),
           **extra)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('mode', choices=('build', 'embed'))
  ap.add_argument('--config')
  ap.add_argument('--inputs', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--model', choices=('clip', 'siglip'), default='clip')
  ap.add_argument('--texts', help='a JSON list of captions, tokenised by DIR/tokenizer.json (embed)')
  ap.add_argument('--spiece', help='a SentencePiece model: saved in DIR as a SiglipTokenizer (build)')
  args = ap.parse_args()
  import torch
  import transformers
  siglip = args.model == 'siglip'
  Config, Model = ((transformers.SiglipConfig, transformers.SiglipModel) if siglip
                   else (transformers.CLIPConfig, transformers.CLIPModel))
  inputs = np.load(args.inputs)
  if args.mode == 'build':
    with open(args.config) as f:
      cfg = Config(**json.load(f))
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():  # every weight away from its init (LayerNorm gains off 1, biases off 0)
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(args.out)  # config.json + model.safetensors
    if args.spiece:  # spiece.model + tokenizer_config.json, as SigLIP's hub directories ship them
      transformers.SiglipTokenizer(vocab_file=args.spiece).save_pretrained(args.out)
  else:
    model = Model.from_pretrained(args.out).eval()
  texts = None
  if args.texts:
    with open(args.texts) as f:
      texts = json.load(f)
  _embed(model, inputs, args.out, siglip, texts)
  print(json.dumps({'ok': True}))


if __name__ == '__main__':
  main()
