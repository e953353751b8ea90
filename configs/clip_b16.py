"""CLIP ViT-B/16 (Radford et al. 2021) as open_clip's ViT-B-16: the GPU benchmark model, batch 256 per device.

  vlp bench step --config=configs/clip_b16.py:8 --compare=open_clip    # 8 devices: global batch 2048
  bash launch/gpu_bench.sh                                              # installs, then the line above on one GPU
The argument is the device count (default 1): the global batch is 256 per device.

Source: open_clip's model_configs/ViT-B-16.json and its CLIP model (OpenAI's architecture).
  Image: ViT-B/16 at 224 px (12 x 768, 12 heads, MLP 3072), a [CLS] token pooled, a
         LayerNorm before the encoder, no patch bias, a projection without bias.
  Text:  CLIP's Transformer (12 x 512, 8 heads, MLP 2048) over 77 tokens of a 49408-token
         vocabulary, causal, pooled at the end-of-text token; 512-d embeddings.
  Both:  exact GELU (open_clip's ViT-B-16; OpenAI's checkpoints and open_clip's
         ViT-B-16-quickgelu use QuickGELU: --config.model.arch.gelu=quick), LayerNorm eps 1e-5,
         CLIP's scaled-normal initialisation, the learnt temperature from 1/0.07, softmax loss.
  Optimiser: CLIP's AdamW (lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2, warm-up
         2000 steps).
What differs: the batch (256 per device here, 32768 in the paper) and the data (the built-in
scenes; for web data set data.* as configs/align_web.py does).
bf16 compute, fp32 master params and AdamW state (open_clip's --precision amp_bf16). No
rematerialisation: the plan's estimate of the activations of 256 examples is 23.3 GiB per
device, beside 1.7 GiB of fp32 params and AdamW state (31.6 model TFLOP per step and device).
"""
from vlp.recipes import base_config

PER_DEVICE_BATCH = 256


def get_config(arg=None):
  devices = int(arg or 1)
  c = base_config('align')
  c.total_steps = 100_000
  c.batch_size = PER_DEVICE_BATCH * devices
  c.model.image.update(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                       pool='cls', ln_pre=True, patch_bias=False)
  c.model.text.update(vocab_size=49408, context_length=77, width=512, depth=12, num_heads=8, mlp_dim=2048,
                      causal=True, pool='eos')
  c.model.embed_dim = 512
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.arch.update(init='clip', gelu='erf', ln_eps=1e-5)
  c.optim.update(name='adamw', lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, warmup_steps=2_000, weight_decay=0.2)
  c.eval_every = 5_000
  c.checkpoint.every = 2_000
  return c
