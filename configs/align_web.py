"""ALIGN-style dual encoder on web image-text data (LAION, WIT, any img2dataset download).

The data path, from img2dataset shards to training:
  vlp data check 'laion/{00000..00099}.tar'                  # what is in there, what is broken
  vlp data convert 'laion/{00000..00099}.tar' --out laion_ar --min_similarity 0.28
  vlp data tokenizer --out sp32k --vocab_size 32000 --records laion_ar
  vlp train --config=configs/align_web.py:arrayrecord --workdir=workdirs/web \
      --config.data.train=laion_ar --config.data.eval=laion_eval_ar \
      --config.data.tokenizer=sp32k.model
`:webdataset` streams the tar shards as they are instead (no conversion):
  --config.data.train='laion/{00000..00099}.tar'
The model is ViT-B/16 (224 px) with a 12-layer text tower, as in CLIP ViT-B/16.
"""
from vlp.recipes import base_config


def get_config(arg=None):
  c = base_config()
  c.total_steps = 100_000
  c.batch_size = 4096
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
  c.model.text.update(vocab_size=32_000, context_length=64, width=512, depth=12, num_heads=8, mlp_dim=2048)
  c.model.embed_dim = 512
  c.model.dtype = 'bfloat16'
  c.loss.label_smoothing = 0.1  # as in ALIGN
  c.optim.update(lr=1e-3, warmup_steps=5_000, weight_decay=0.2)
  c.data.update(name=arg or 'arrayrecord', train='', eval='', eval_images=5_000, tokenizer='', crop_scale=(0.5, 1.0),
                num_workers=8, prefetch=4, cycle_length=8, shuffle_window=10_000)
  c.eval_every = 5_000
  c.checkpoint.every = 2_000
  return c
