"""SigLIP B/16 (Zhai et al. 2023) as big_vision builds it: ViT-B/16 with a MAP head, a B-sized
text transformer, the sigmoid loss, batch 32768.

Source: big_vision's SigLIP models (`proj.image_text.two_towers` with image
`vit` pool_type='map' and text `proj.image_text.text_transformer`,
out_dim=(None, 768), temperature_init=10, bias_init=-10; the public
webli_en_b16_224 checkpoint's config), the SigLIP paper for the batch.
  Image: ViT-B/16 at 224 px (12 x 768, 12 heads, MLP 3072), no CLS token, pooled by a
         multi-head attention probe (MAP), a biased patch embedding, no LayerNorm before
         the encoder, and no projection: the 768-d pooled feature is the embedding.
  Text:  12 x 768, 12 heads, MLP 3072 over 64 tokens of a 32000-token vocabulary,
         bidirectional, pooled at the last token with no padding mask (big_vision pads
         with a sticky EOS), then a biased projection to 768.
  Both:  tanh GELU (flax's default), LayerNorm eps 1e-6, learnt temperature (init 10) and
         bias (init -10).
What differs: AdamW (lr 1e-3, weight decay 1e-4) where the paper uses big_vision's
Adafactor-style optimizer; vlp's own tokenizer (data.tokenizer) where big_vision uses the
c4_en SentencePiece model; initialisation by vlp's Xavier scheme (model.arch.init).

Target topology: v5e-256 (256 v5e chips, 16x16), checked before any chip is booked:
  vlp compile --config=configs/siglip_b16.py --topology=v5e-256 --json=siglip_b16.json
bf16 compute, fp32 master params and optimizer state, blocks rematerialised, FSDP over all
256 chips, the 32768 x 32768 sigmoid logits walked in blocks of 1024 rows (loss.chunk_size).
"""
from vlp.recipes import base_config


def get_config(arg=None):
  del arg
  c = base_config('align')
  c.total_steps = 100_000
  c.batch_size = 32768
  c.model.head = 'sigmoid'
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                       pool='map', cls_token=False, ln_pre=False, patch_bias=True)
  c.model.text.update(vocab_size=32_000, context_length=64, width=768, depth=12, num_heads=12, mlp_dim=3072,
                      causal=False, pool='last', padding_mask=False)
  c.model.embed_dim = 768
  c.model.image_proj = False  # the MAP head's output is the embedding (big_vision's out_dim=(None, 768))
  c.model.proj_bias = True  # the text head is a Dense with a bias
  c.model.arch.update(gelu='tanh', ln_eps=1e-6)
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
