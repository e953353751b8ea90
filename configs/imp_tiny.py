"""IMP, tiny and dense, on the built-in scenes and clips: the baseline of imp_moe_tiny.

One Transformer for images, video and text, trained by alternating gradient
descent over four tasks (a few minutes on a 2-core CPU):
  vlp train --config=configs/imp_tiny.py --workdir=workdirs/imp_tiny
  image_text   image-caption NCE, at 32 and 48 px in turn (the 48 px batch
               scaled to the same image tokens)
  video_text   clip-caption NCE, 8 frames in tubelets of 2, 75% of the video
               tokens dropped (DropToken): a clip costs what an image does
  image_class  colour + shape of the first object (48 class names as prompts)
  video_class  colour + motion of the first object (32 class names)
`:weighted` samples tasks by weight instead of the interval rotation.
"""
from vlp.core.config import eval_config, task_config
from vlp.recipes import base_config


def get_config(arg=None):
  c = base_config('imp')
  c.total_steps = 600
  c.model.image.update(image_size=32, patch_size=4)  # the embedders' patch and native grid
  c.model.text.update(vocab_size=1024, context_length=32)
  c.model.encoder.update(width=128, depth=4, num_heads=4, mlp_dim=512, qk_layernorm=True)
  c.model.video.update(frames=8, tubelet_size=2)
  c.model.embed_dim = 128
  # no label smoothing at this batch: measured together with the recipe's arch defaults (docs/results.md)
  c.tasks.image_text = task_config(data='synthetic', modalities=('image', 'text'), batch_size=128,
                                   resolutions=(32, 48))
  c.tasks.video_text = task_config(data='synthetic_video', modalities=('video', 'text'), batch_size=128,
                                   drop_token=0.75)
  c.tasks.image_class = task_config(data='synthetic', modalities=('image',), loss='classification',
                                    batch_size=128, interval=2)
  c.tasks.video_class = task_config(data='synthetic_video', modalities=('video',), loss='classification',
                                    batch_size=128, interval=2, drop_token=0.75)
  # interval: per 2 rounds image_text 2, video_text 2, image_class 1, video_class 1 steps;
  # weighted: the same shares on average
  c.agd.schedule = arg or 'interval'
  c.tasks.image_text.weight = c.tasks.video_text.weight = 2.0
  c.optim.update(lr=1e-3, warmup_steps=60, weight_decay=0.05)
  c.data.update(num_workers=0, prefetch=2)  # four input pipelines: threads, not processes
  c.evals.retrieval = eval_config('retrieval', data='task')  # held-out scenes, 4 captions each
  c.evals.video_retrieval = eval_config('retrieval', data='synthetic_video', num_images=500)
  c.evals.zeroshot = eval_config('zeroshot', data='synthetic', num_images=500)
  c.evals.video_zeroshot = eval_config('zeroshot', data='synthetic_video', num_images=500)
  c.eval_every = 300
  c.checkpoint.every = 300
  return c
