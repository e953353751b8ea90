"""SigLIP B/16 (Zhai et al. 2023): ViT-B/16 and a B-sized text tower, sigmoid loss, batch 32768.

Target topology: v5e-256 (256 v5e chips, 16x16), checked before any chip is booked:
  vlp compile --config=configs/siglip_b16.py --topology=v5e-256 --json=siglip_b16.json
ViT-B/16 at 224 px (12 x 768, 12 heads, MLP 3072) and a 12 x 768 text tower
over 64 tokens of a 32000-token vocabulary, 768-d embeddings, the sigmoid
loss with its learnt temperature and bias (model.head='sigmoid'). bf16
compute, fp32 master params and optimizer state, blocks rematerialised,
FSDP over all 256 chips, the 32768 x 32768 sigmoid logits walked in blocks of
1024 rows (loss.chunk_size).
"""
from vlp.recipes import base_config


def get_config(arg=None):
  del arg
  c = base_config('align')
  c.total_steps = 100_000
  c.batch_size = 32768
  c.model.head = 'sigmoid'
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
  c.model.text.update(vocab_size=32_000, context_length=64, width=768, depth=12, num_heads=12, mlp_dim=3072)
  c.model.embed_dim = 768
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = 'full'
  c.model.scan_layers = True  # each tower's like blocks as one scan: compiled once, not 12 times
  c.loss.chunk_size = 1024
  c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
  c.optim.update(lr=1e-3, warmup_steps=5_000, weight_decay=1e-4)
  c.data.update(name='arrayrecord', train='webli_ar', tokenizer='sp32k.model', num_workers=8, prefetch=4)
  c.eval_every = 5_000
  c.checkpoint.every = 2_000
  return c
