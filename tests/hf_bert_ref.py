"""Runs in the open_clip environment with transformers (launch/setup_bench_env.sh), not vlp's:

  python tests/hf_bert_ref.py build --config CFG.json --vocab V.json --tokens T.npy --texts X.json --out DIR [--mlm]
      a random BertModel (BertForMaskedLM with --mlm) and its WordPiece tokenizer, saved in DIR
  python tests/hf_bert_ref.py run --tokens T.npy --texts X.json --out DIR
      BertModel / BertForMaskedLM.from_pretrained(DIR)
Both write DIR/outputs.npz: the last hidden states, every layer's hidden states, the pooler output
or the MLM logits of the tokens (attention mask: ids != [PAD] = 0), and the texts tokenised by
DIR's tokenizer (padded to the tokens' length, truncated).
"""
import argparse
import json
import os

import numpy as np


def _outputs(model, tokens, texts, out):
  import torch
  from transformers import BertTokenizerFast
  ids = torch.from_numpy(tokens).long()
  with torch.no_grad():
    o = model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
  hidden = o.hidden_states
  extra = {'mlm_logits': o.logits.numpy()} if hasattr(o, 'logits') else {'pooled': o.pooler_output.numpy()}
  tok = BertTokenizerFast.from_pretrained(out)
  text_ids = tok(texts, padding='max_length', max_length=tokens.shape[1], truncation=True)['input_ids']
  np.savez(os.path.join(out, 'outputs.npz'), last=hidden[-1].numpy(), hidden=np.stack([h.numpy() for h in hidden]),
           text_ids=np.asarray(text_ids, np.int64), **extra)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('mode', choices=('build', 'run'))
  ap.add_argument('--config')
  ap.add_argument('--vocab', help='a JSON list of WordPiece tokens (build)')
  ap.add_argument('--tokens', required=True)
  ap.add_argument('--texts', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--mlm', action='store_true')
  args = ap.parse_args()
  import torch
  import transformers
  tokens = np.load(args.tokens)
  with open(args.texts) as f:
    texts = json.load(f)
  if args.mode == 'build':
    with open(args.config) as f:
      cfg = transformers.BertConfig(**json.load(f))
    torch.manual_seed(0)
    model = (transformers.BertForMaskedLM if args.mlm else transformers.BertModel)(cfg).eval()
    with torch.no_grad():  # every weight away from its init (LayerNorm gains off 1, biases off 0)
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(args.out)  # config.json + model.safetensors
    with open(args.vocab) as f:
      vocab = json.load(f)
    # transformers' own WordPiece tokenizer of the vocabulary, saved as the hub has it (tokenizer.json, ...)
    transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(
        args.out)
  else:
    arch = json.load(open(os.path.join(args.out, 'config.json')))['architectures'][0]
    model = getattr(transformers, arch).from_pretrained(args.out).eval()
  _outputs(model, tokens, texts, args.out)
  print(json.dumps({'ok': True}))


if __name__ == '__main__':
  main()
