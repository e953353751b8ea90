"""The reference input pipeline of `vlp bench data`: webdataset + torch DataLoader.

Runs in the bench environment (`bash launch/setup_bench_env.sh`), never
imports vlp, and does the work vlp's pipeline does, the way open_clip-style
training code does it: stream the tar shards with webdataset, decode with PIL,
random-resized crop (the torchvision recipe on a PIL image: crop, then
bilinear antialiased resize), scale pixels to [-1, 1], tokenise with the same
SentencePiece model, pad to the context length, batch in the workers
(`batched`) and load with a DataLoader of N worker processes.

  python data_ref.py --shards a.tar b.tar --workers 2 --batch 128 --image_size 64 \
      --context_length 32 --tokenizer sp.model --batches 20
"""
import argparse
import json
import math
import random
import time

import numpy as np
import sentencepiece as spm
import torch
import webdataset as wds


def crop_box(width, height, scale, ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params: 10 tries, then the central crop."""
  area = width * height
  for _ in range(10):
    target = area * random.uniform(*scale)
    aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      x, y = random.randint(0, width - w), random.randint(0, height - h)
      return x, y, x + w, y + h
  side = min(width, height)
  return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2


class Transform:

  def __init__(self, size, scale, tokenizer_path, context_length):
    self.size, self.scale, self.context_length = size, scale, context_length
    self.tokenizer_path, self.sp = tokenizer_path, None

  def __call__(self, sample):
    if self.sp is None:  # loaded in the worker process
      self.sp = spm.SentencePieceProcessor(model_file=self.tokenizer_path)
    image, caption = sample
    image = image.convert('RGB')
    box = crop_box(*image.size, self.scale)
    image = image.crop(box).resize((self.size, self.size), resample=2)  # 2 = BILINEAR
    pixels = np.asarray(image, np.uint8)  # as vlp's pipeline hands them out: normalised on the device
    ids = [self.sp.bos_id()] + self.sp.encode(caption)[:self.context_length - 2] + [self.sp.eos_id()]
    tokens = np.zeros(self.context_length, np.int32)
    tokens[:len(ids)] = ids
    return torch.from_numpy(pixels), torch.from_numpy(tokens)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--shards', nargs='+', required=True)
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--image_size', type=int, default=64)
  p.add_argument('--context_length', type=int, default=32)
  p.add_argument('--crop_scale', type=float, nargs=2, default=(0.5, 1.0))
  p.add_argument('--tokenizer', required=True)
  p.add_argument('--batches', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  a = p.parse_args()
  torch.set_num_threads(1)
  ds = (wds.WebDataset(a.shards, resampled=True, shardshuffle=False, nodesplitter=None)
        .shuffle(1000).decode('pil').to_tuple('jpg;png;webp', 'txt')
        .map(Transform(a.image_size, tuple(a.crop_scale), a.tokenizer, a.context_length))
        .batched(a.batch))
  loader = wds.WebLoader(ds, batch_size=None, num_workers=a.workers)
  it = iter(loader)
  for _ in range(a.warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(a.batches):
    images, _ = next(it)
    assert images.shape == (a.batch, a.image_size, a.image_size, 3)
  seconds = time.perf_counter() - t
  print(json.dumps({'images_per_sec': a.batch * a.batches / seconds, 'workers': a.workers,
                    'torch_version': torch.__version__, 'webdataset_version': wds.__version__}))


if __name__ == '__main__':
  main()
