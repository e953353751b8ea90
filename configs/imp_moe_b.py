"""IMP-MoE-B (Akbari et al. 2023): one 12-block encoder of width 768 for images, video and
text, 16-expert Mixture-of-Experts MLPs (expert choice, capacity factor 1.0) in its last 6
blocks, trained by alternating gradient descent over image-text, video-text, image and video
classification.

Target topology: v5p-256 (128 v5p chips, 4x4x8), checked before any chip is booked:
  vlp compile --config=configs/imp_moe_b.py --topology=v5p-256 --json=imp_moe_b.json
Encoder 12 x 768, 12 heads, MLP 3072, QK LayerNorm; patches of 16 px at 224
px (196 tokens); clips of 16 frames in tubelets of 4 x 16 x 16 (784 tokens,
75% dropped by DropToken: 196 kept); text of 64 tokens; 768-d embeddings.
Tasks (global batch): image_text 16384, video_text 4096, image_class 8192,
video_class 2048 (the classification tasks take the built-in labelled data
as stand-ins for JFT / Kinetics-style labels; image_text reads config.data).
bf16 compute, fp32 master params and optimizer state, every block
rematerialised, weights (experts included) and optimizer state sharded over
all chips (FSDP). The MoE blocks are the last half of the stack, as in the
paper's MoE models; set data.tokenizer to a real SentencePiece model for training.

Source and what differs: the IMP paper's B-sized MoE model (one modality-agnostic 12 x 768
encoder, 16 experts with expert-choice routing, alternating gradient descent over tasks,
DropToken on video). What is vlp's own, not checked against the paper's appendix: the task
mix and its global batches and weights, the stand-in data of the classification and video
tasks (the built-in labelled scenes and clips for JFT / Kinetics-style labels; no reader of
real video yet), AdamW (lr 1e-3, weight decay 0.05) and the 500k steps.
"""
from vlp.core.config import task_config
from vlp.recipes import base_config


def get_config(arg=None):
  c = base_config('imp')
  c.total_steps = 500_000
  c.model.image.update(image_size=224, patch_size=16)
  c.model.text.update(vocab_size=32_000, context_length=64)
  c.model.encoder.update(width=768, depth=12, num_heads=12, mlp_dim=3072, qk_layernorm=True)
  c.model.encoder.moe.update(num_experts=16, every=1, last=6, router='expert_choice', capacity_factor=1.0)
  c.model.video.update(frames=16, tubelet_size=4)
  c.model.embed_dim = 768
  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'float32'
  c.model.remat = 'full'
  c.model.scan_layers = True  # the encoder's like dense blocks as one scan (MoE blocks stay unrolled)
  c.tasks.image_text = task_config(data='task', modalities=('image', 'text'), batch_size=16384, label_smoothing=0.1)
  c.tasks.video_text = task_config(data='synthetic_video', modalities=('video', 'text'), batch_size=4096,
                                   drop_token=0.75, label_smoothing=0.1)
  c.tasks.image_class = task_config(data='synthetic', modalities=('image',), loss='classification',
                                    batch_size=8192, interval=2)
  c.tasks.video_class = task_config(data='synthetic_video', modalities=('video',), loss='classification',
                                    batch_size=2048, interval=2, drop_token=0.75)
  c.agd.schedule = arg or 'interval'
  c.tasks.image_text.weight = c.tasks.video_text.weight = 2.0
  c.mesh = dict(data=1, fsdp=-1, tensor=1, expert=1)
  c.optim.update(lr=1e-3, warmup_steps=10_000, weight_decay=0.05)
  c.data.update(name='arrayrecord', train='image_text_ar', num_workers=8, prefetch=4)
  c.eval_every = 5_000
  c.checkpoint.every = 2_000
  return c
