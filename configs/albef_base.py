"""ALBEF at the paper's sizes (Li et al. 2021): ViT-B/16 at 256 px, a 12-layer BERT-base text
stack fused from layer 6, batch 512.

Source: salesforce/ALBEF's configs/Pretrain.yaml and models/model_pretrain.py: image_res 256,
embed_dim 256, temp 0.07, mlm_probability 0.15, queue_size 65536, momentum 0.995, alpha 0.4
(ramped over the first epoch), batch 64 x 8 GPUs, AdamW lr 1e-4 with weight decay 0.02,
cosine to 1e-5 over 30 epochs after a 2000-step warm-up (its warmup_epochs=20 steps of 100
iterations); fusion from BERT layer 6; exact GELU.
What differs: ALBEF starts the ViT from DeiT's ImageNet weights and the text from
bert-base-uncased (here: from scratch, or the text from a BERT import with the config's
argument, below); its warm-up starts at 1e-5 (here at 0); one LayerNorm eps for both towers
(1e-5; BERT's 1e-12 with a BERT import; timm's ViT uses 1e-6); the text blocks are pre-LN
unless started from BERT; no RandAugment.
  vlp train --config=configs/albef_base.py --workdir=DIR --config.data.name=webdataset \\
      --config.data.train='laion/{00000..00999}.tar' --config.data.tokenizer=sp32k.model
Target topology: v4-32 (16 v4 chips, 2x2x4; 32 examples per chip), checked before any chip
is booked:
  vlp compile --config=configs/albef_base.py --topology=v4-32 --json=albef_base.json
As ALBEF, the text stack starts from bert-base-uncased when the config's argument names
its import (BERT's post-LN layout, its WordPiece vocabulary, LayerNorm eps 1e-12):
  vlp import bert-base-uncased --out=bert   # a transformers directory (config.json, model.safetensors)
  vlp train --config=configs/albef_base.py:bert --workdir=DIR ...
Without an argument it starts from scratch with vlp's SentencePiece vocabulary: give a
30k-ish tokenizer (`vlp data tokenizer`).
"""
from vlp.recipes import base_config


def get_config(arg=None):
  c = base_config('albef')
  c.batch_size = 512
  c.total_steps = 30 * 14_000_000 // 512  # 30 epochs of the 14M-pair corpus
  c.model.image.update(image_size=256, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
  c.model.text.update(vocab_size=30522, context_length=30, width=768, depth=12, num_heads=12, mlp_dim=3072)
  c.model.fusion_layer = 6
  c.model.embed_dim = 256
  c.model.dtype = 'bfloat16'
  c.model.scan_layers = True  # each stack's like blocks as one scan: compiled once, not 12 times
  c.albef.update(queue_size=65536, momentum=0.995, alpha=0.4, alpha_warmup_steps=14_000_000 // 512)
  c.evals.retrieval.rerank_k = 256
  c.optim.update(lr=1e-4, end_lr_frac=0.1, warmup_steps=2000, weight_decay=0.02, b2=0.999, eps=1e-8)
  c.data.update(crop_scale=(0.2, 1.0), flip=True)  # as ALBEF (which adds RandAugment)
  c.eval_every = 5000
  c.checkpoint.every = 2000
  if arg:  # a BERT import: the text stack, its MLM head and the captions' vocabulary start from it
    c.model.text.post_ln = True
    c.model.arch.ln_eps = 1e-12  # BERT's; the ViT takes it too (one model.arch for both towers)
    c.init.text_from = arg
    c.data.tokenizer = f'{arg}/tokenizer.json'
  return c
