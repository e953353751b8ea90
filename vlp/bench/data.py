"""`vlp bench data`: images/s of decode + random-resized crop + tokenise + batch.

Writes img2dataset-style tar shards of JPEGs (the built-in scenes rendered at
`--source_size` px with sensor-like noise, so that they decode like photos, not
like flat colour), then times vlp's Grain pipeline on them, streamed from the
tars and read from their ArrayRecord conversion, and with
`--compare=webdataset` the webdataset + torch DataLoader reference
(`benchmarks/data_ref.py`) on the same shards with the same worker count.

  vlp bench data --workers 2 --image_size 64 --compare=webdataset
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import subprocess
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from vlp.bench import compare
from vlp.data import arrayrecord, pipeline, synthetic, tokenizer as tok, webdataset, convert as convert_lib

REF_SCRIPT = str(compare.BENCHMARKS / 'data_ref.py')


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir: str, num_shards: int, per_shard: int, source_size: int,
                 seed: int = 0) -> list[str]:
  """img2dataset layout: NNNNN.tar with KEY.jpg / KEY.txt / KEY.json members."""
  scenes = synthetic.SyntheticScenes(num_examples=num_shards * per_shard, image_size=source_size,
                                     seed=seed)
  rng = np.random.default_rng(seed)
  paths = []
  for s in range(num_shards):
    path = os.path.join(out_dir, f'{s:05d}.tar')
    with tarfile.open(path, 'w') as tar:
      for i in range(s * per_shard, (s + 1) * per_shard):
        ex = scenes[i]
        noisy = np.clip(ex['image'] + rng.normal(0, 12, ex['image'].shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, 'JPEG', quality=90)
        key = f'{i:09d}'
        _add(tar, f'{key}.jpg', buf.getvalue())
        _add(tar, f'{key}.txt', ex['caption'].encode())
        _add(tar, f'{key}.json', json.dumps({'key': key, 'url': f'synthetic://{i}', 'status': 'success',
                                             'width': source_size, 'height': source_size}).encode())
    paths.append(path)
  return paths


def time_iterator(iterator, batches: int, warmup: int, batch_size: int) -> float:
  """Images/s of `batches` batches after `warmup` (the workers' start-up is not counted)."""
  for _ in range(warmup):
    next(iterator)
  t = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batch_size * batches / (time.perf_counter() - t)


def run_vlp(kind: str, paths, args, tokenizer) -> float:
  prep = pipeline.Preprocess(tokenizer, args.context_length, args.image_size, train=True,
                             crop_scale=tuple(args.crop_scale))
  if kind == 'webdataset':
    ds = pipeline.stream_dataset(paths, webdataset.read_shard, prep, batch_size=args.batch, seed=0,
                                 shuffle_window=args.shuffle_window)
  else:
    ds = pipeline.train_dataset(arrayrecord.Source(paths), prep, batch_size=args.batch, seed=0)
  iterator = pipeline.make_iterator(ds, num_workers=args.workers, prefetch=4)
  try:
    return time_iterator(iterator, args.batches, args.warmup, args.batch)
  finally:
    iterator.close()


def run_reference(shards, args, tokenizer) -> dict:
  cmd = [compare.bench_python(), '-I', REF_SCRIPT, '--shards', *shards, '--workers', str(args.workers),
         '--batch', str(args.batch), '--image_size', str(args.image_size),
         '--context_length', str(args.context_length), '--tokenizer', tokenizer.model_path,
         '--batches', str(args.batches), '--warmup', str(args.warmup),
         '--crop_scale', *map(str, args.crop_scale)]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
  if out.returncode != 0:
    raise compare.ReferenceEnvError(f'webdataset reference failed: {out.stderr.strip()[-2000:]}; '
                                    + compare.SETUP_HINT)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  p = argparse.ArgumentParser(prog='vlp bench data', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workers', type=int, default=2)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--image_size', type=int, default=64)
  p.add_argument('--source_size', type=int, default=256, help='side of the JPEGs in the shards')
  p.add_argument('--context_length', type=int, default=32)
  p.add_argument('--crop_scale', type=float, nargs=2, default=(0.5, 1.0))
  p.add_argument('--shards', type=int, default=8)
  p.add_argument('--per_shard', type=int, default=256)
  p.add_argument('--batches', type=int, default=20)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--shuffle_window', type=int, default=1000,
                 help="vlp's streaming shuffle window (the reference shuffles 1000); at most the records "
                      'one reader reads per pass')
  p.add_argument('--repeats', type=int, default=3, help='rounds; medians are reported')
  p.add_argument('--compare', choices=('webdataset',))
  args = p.parse_args(argv)
  tokenizer = tok.builtin_tokenizer()
  with tempfile.TemporaryDirectory() as tmp:
    shards = write_shards(tmp, args.shards, args.per_shard, args.source_size)
    convert_lib.convert(convert_lib.parse_convert_args([*shards, '--out', os.path.join(tmp, 'ar'),
                                                        '--workers', str(args.workers), '--quiet']))
    # Rounds alternate the pipelines so that a busy machine slows them alike;
    # each figure is the median over rounds.
    runs = collections.defaultdict(list)
    for _ in range(args.repeats):
      runs['vlp_webdataset_images_per_sec'].append(run_vlp('webdataset', shards, args, tokenizer))
      runs['vlp_arrayrecord_images_per_sec'].append(run_vlp('arrayrecord', os.path.join(tmp, 'ar'), args, tokenizer))
      if args.compare:
        ref = run_reference(shards, args, tokenizer)
        runs['reference_images_per_sec'].append(ref.pop('images_per_sec'))
    result = {k: float(np.median(v)) for k, v in runs.items()}
    result.update(workers=args.workers, batch=args.batch, image_size=args.image_size,
                  source_size=args.source_size, repeats=args.repeats)
    if args.compare:
      result['reference'] = ref
      result['ratio_webdataset_input'] = (result['vlp_webdataset_images_per_sec']
                                          / result['reference_images_per_sec'])
      result['ratio_arrayrecord'] = result['vlp_arrayrecord_images_per_sec'] / result['reference_images_per_sec']
  print(json.dumps(result))
