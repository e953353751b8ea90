"""ALIGN (Jia et al. 2021) at the paper's scale, with a ViT-L/16 image tower: global batch 16384.

Source: the ALIGN paper (section 5): a BERT-Large text encoder pooled at [CLS] with a linear
layer to the embedding, 640-d embeddings, the normalised softmax loss with a learnt
temperature (started at 1.0) and label smoothing 0.1, batch 16384.
  Image: ViT-L/16 at 224 px (24 x 1024, 16 heads, MLP 4096, 197 tokens), its patch tokens
         averaged ('gap', the closest to EfficientNet's global pooling), projected to 640.
  Text:  BERT-Large's sizes (24 x 1024, 16 heads, MLP 4096, a 30522-token vocabulary) over
         64 tokens, bidirectional, pooled at [CLS], projected to 640.
What differs: the image tower is a ViT-L/16, not the paper's EfficientNet-L2 at 289 px (vlp
builds no CNN); the text blocks are pre-LN, not BERT's post-LN; AdamW (lr 1e-3, weight decay
0.2, cosine) where the paper uses LAMB (lr 1e-3, weight decay 1e-5, linear decay over 1.2M
steps): LAMB's per-parameter trust ratio is refused with blocks stored stacked
(model.scan_layers); 100k steps here.

Target topology: v5p-256 (128 v5p chips, one 4x4x8 slice), checked before any chip is booked:
  vlp compile --config=configs/align_l16.py --topology=v5p-256 --json=align_l16.json
bf16 compute, fp32 master params and Adam state, every block rematerialised, weights and
optimizer state sharded over all 128 chips (FSDP: mesh fsdp=-1), the 16384 x 16384 logits
walked in blocks of 1024 rows (loss.chunk_size).
"""
from vlp.recipes import base_config


def get_config(arg=None):
  del arg
  c = base_config('align')
  c.total_steps = 100_000
  c.batch_size = 16384
  c.model.image.update(image_size=224, patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096)
  c.model.text.update(vocab_size=30522, context_length=64, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                      causal=False, pool='cls')
  c.model.image.pool = 'gap'
  c.model.embed_dim = 640
  c.model.logit_scale_init = 1.0  # the paper's learnt temperature starts at 1
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = 'full'
  c.model.scan_layers = True  # each tower's like blocks as one scan: compiled once, not 24 times
  c.loss.update(label_smoothing=0.1, chunk_size=1024)
  c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
  c.optim.update(lr=1e-3, warmup_steps=5_000, weight_decay=0.2)
  c.data.update(name='arrayrecord', train='laion_ar', tokenizer='sp32k.model', num_workers=8, prefetch=4)
  c.eval_every = 5_000
  c.checkpoint.every = 2_000
  return c
