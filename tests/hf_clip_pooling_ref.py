"""Runs in the open_clip environment with transformers (launch/setup_bench_env.sh), not vlp's:

  python tests/hf_clip_pooling_ref.py build --cases CASES.json --out DIR   # a random CLIPModel per case, saved
  python tests/hf_clip_pooling_ref.py embed --cases CASES.json --out DIR   # CLIPModel.from_pretrained(DIR/name)

CASES.json: [{"name", "text_config" (CLIPTextConfig keys over the base below), "tokens" ([B, L] ids),
and optionally "texts" with "pad_token": captions tokenised by DIR/name/tokenizer.json, padded
with that token}]. Both write DIR/name/embeddings.npz: the normalised text embeddings of the ids
(`ids`) and of the texts (`texts`, with the ids transformers gave them: `text_tokens`), the ids
fed as a transformers user feeds them, without an attention mask (CLIP's text is causal: its
end token sees no padding after it).
"""
import argparse
import json
import os

import numpy as np

BASE = {'projection_dim': 32,
        'text_config': {'vocab_size': 1000, 'hidden_size': 48, 'intermediate_size': 192, 'num_hidden_layers': 2,
                        'num_attention_heads': 2, 'max_position_embeddings': 16},
        'vision_config': {'hidden_size': 64, 'intermediate_size': 256, 'num_hidden_layers': 2,
                          'num_attention_heads': 2, 'image_size': 16, 'patch_size': 4}}


def _build(case):
  import torch
  import transformers
  cfg = json.loads(json.dumps(BASE))
  cfg['text_config'].update(case['text_config'])
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(**cfg)).eval()
  with torch.no_grad():  # every weight away from its init (LayerNorm gains off 1, biases off 0)
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _text_embeddings(model, ids):
  import torch
  with torch.no_grad():
    out = model.get_text_features(input_ids=torch.from_numpy(np.asarray(ids, np.int64)))
  out = getattr(out, 'pooler_output', out)  # transformers 5 returns an output object
  return torch.nn.functional.normalize(out, dim=-1).numpy()


def _embed(model, case, out):
  from transformers import PreTrainedTokenizerFast
  result = {'ids': _text_embeddings(model, case['tokens'])}
  if case.get('texts'):
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, 'tokenizer.json'), pad_token=case['pad_token'])
    length = np.asarray(case['tokens']).shape[1]
    ids = np.asarray(tok(case['texts'], padding='max_length', max_length=length, truncation=True)['input_ids'])
    result.update(texts=_text_embeddings(model, ids), text_tokens=ids)
  np.savez(os.path.join(out, 'embeddings.npz'), **result)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('mode', choices=('build', 'embed'))
  ap.add_argument('--cases', required=True)
  ap.add_argument('--out', required=True)
  args = ap.parse_args()
  import transformers
  with open(args.cases) as f:
    cases = json.load(f)
  for case in cases:
    out = os.path.join(args.out, case['name'])
    if args.mode == 'build':
      model = _build(case)
      model.save_pretrained(out)  # config.json + model.safetensors
    else:
      model = transformers.CLIPModel.from_pretrained(out).eval()
    _embed(model, case, out)
  print(json.dumps({'ok': True}))


if __name__ == '__main__':
  main()
