"""`vlp data convert` (shards -> ArrayRecord) and `vlp data check` (what is in a shard).

Conversion runs one input file per worker process, writes one ArrayRecord
file per input file (so a re-run after a crash redoes only what is missing)
and keeps every record whose image decodes and whose caption is not empty;
everything else is counted by reason, and `vlp data check` lists it by key.

  vlp data convert 'laion/{00000..00099}.tar' --out laion_ar [--min_similarity 0.28]
  vlp data convert --wit wit_v1.train.all-00000-of-00010.tsv.gz \
      --wit_images 'wit_images/*.tar' --languages en,de --out wit_ar
  vlp data check laion_ar
"""
from __future__ import annotations

import argparse
import collections
from collections.abc import Iterator
import json
import multiprocessing
import os
import sys

import tqdm

from vlp.data import arrayrecord, laion, records, transforms, webdataset, wit

SUMMARY = 'convert_summary.json'


def verify(recs: Iterator[dict], max_pixels: int) -> Iterator[dict]:
  """Records whose image decodes and caption is not empty; others become skipped(reason)."""
  for rec in recs:
    if records.is_skipped(rec):
      yield rec
      continue
    if not ' '.join(str(rec.get('caption') or '').split()):
      yield records.skipped(rec['key'], 'empty_caption')
      continue
    try:
      transforms.decode_image(rec['image'], max_pixels=max_pixels)
    except transforms.BadImage as e:
      yield records.skipped(rec['key'], e.reason)
      continue
    yield rec


def _write(out_path: str, recs: Iterator[dict]) -> dict:
  """Writes the usable records; returns {'kept': n, 'skipped': {reason: n}, 'skipped_keys': [...]}."""
  skipped, keys = collections.Counter(), []

  def usable():
    for rec in recs:
      if records.is_skipped(rec) and rec[records.SKIP] == records.RETRIED:
        skipped[records.RETRIED] += 1  # an outage ridden out: counted, nothing lost, no key to list
      elif records.is_skipped(rec):
        skipped[rec[records.SKIP]] += 1
        keys.append([rec['key'], rec[records.SKIP]])
      else:
        yield rec

  kept = arrayrecord.write(out_path, usable())
  return {'kept': kept, 'skipped': dict(skipped), 'skipped_keys': keys}


def _out_path(out_dir: str, src: str) -> str:
  name = os.path.basename(src)
  for ext in ('.tar', '.tsv.gz', '.tsv', '.gz'):
    if name.endswith(ext):
      name = name[:-len(ext)]
      break
  return os.path.join(out_dir, name + arrayrecord.SUFFIX)


class _ConvertShard:
  """One img2dataset tar -> one ArrayRecord file (a class: picklable for the pool)."""

  def __init__(self, out_dir, flt, metadata, max_pixels):
    self.out_dir, self.flt, self.metadata, self.max_pixels = out_dir, flt, metadata, max_pixels

  def __call__(self, shard: str) -> tuple[str, dict]:
    recs = webdataset.read_shard(shard)
    if self.metadata:
      recs = _join_metadata(recs, self.metadata)
    recs = laion.apply_filter(recs, self.flt)
    return shard, _write(_out_path(self.out_dir, shard), verify(recs, self.max_pixels))


def _join_metadata(recs, metadata):
  """Adds the metadata row of each record's URL; its values win over the shard's .json
  (a user who passes metadata means to filter on it, e.g. newer safety scores)."""
  for rec in recs:
    if not records.is_skipped(rec) and rec.get('url') in metadata:
      row = {k: v for k, v in metadata[rec['url']].items() if k != 'caption'}
      rec['meta'] = {**rec['meta'], **row}
    yield rec


class _ConvertWit:
  """One WIT TSV -> one ArrayRecord file, images looked up by URL."""

  def __init__(self, out_dir, policy, images, max_pixels):
    self.out_dir, self.policy, self.images, self.max_pixels = out_dir, policy, images, max_pixels

  def __call__(self, tsv: str) -> tuple[str, dict]:
    recs = wit.join(wit.read_tsv(tsv, self.policy), self.images)
    return tsv, _write(_out_path(self.out_dir, tsv), verify(recs, self.max_pixels))


def _run(job, inputs, workers: int, out_dir: str, quiet: bool = False) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  total = {'inputs': len(inputs), 'kept': 0, 'skipped': collections.Counter(), 'files': {}}
  bar = tqdm.tqdm(total=len(inputs), unit='file', dynamic_ncols=True, disable=quiet)
  pool = multiprocessing.get_context('spawn').Pool(workers) if workers > 1 else None
  results = pool.imap_unordered(job, inputs) if pool else map(job, inputs)
  try:
    for src, r in results:
      total['kept'] += r['kept']
      total['skipped'].update(r['skipped'])
      total['files'][src] = r
      bar.update(1)
      bar.set_postfix(kept=total['kept'], skipped=sum(total['skipped'].values()))
  finally:
    bar.close()
    if pool:
      pool.close()
      pool.join()
  total['skipped'] = dict(total['skipped'])
  with open(os.path.join(out_dir, SUMMARY), 'w') as f:
    json.dump(total, f, indent=1, ensure_ascii=False)
  return total


def convert(args) -> dict:
  flt = laion.Filter(min_similarity=args.min_similarity, min_width=args.min_size,
                     min_height=args.min_size, max_punsafe=args.max_punsafe,
                     languages=tuple(args.languages.split(',')) if args.languages else None)
  if args.wit:
    tsvs = webdataset.expand(args.wit)
    policy = wit.CaptionPolicy(languages=flt.languages, main_image_only=args.main_image_only)
    images = {}
    if args.wit_images:
      images.update(wit.images_from_shards(webdataset.expand(args.wit_images)))
    if args.wit_pixels:
      images.update(wit.images_from_pixel_files(webdataset.expand(args.wit_pixels)))
    job = _ConvertWit(args.out, policy, images, args.max_pixels)
    return _run(job, tsvs, args.workers, args.out, args.quiet)
  if not args.src:
    raise ValueError('nothing to convert: give img2dataset shards or --wit TSV files')
  metadata = laion.read_metadata(webdataset.expand(args.metadata)) if args.metadata else None
  job = _ConvertShard(args.out, flt, metadata, args.max_pixels)
  return _run(job, webdataset.expand(args.src), args.workers, args.out, args.quiet)


def _records_of(path: str) -> Iterator[dict]:
  if arrayrecord.looks_like(path):
    src = arrayrecord.Source(path)
    return (src[i] for i in range(len(src)))
  return webdataset.read_shards(webdataset.expand(path))


def _histogram(values, edges):
  counts = collections.Counter()
  for v in values:
    label = next((f'<={e}' for e in edges if v <= e), f'>{edges[-1]}')
    counts[label] += 1
  return {lab: counts[lab] for lab in [f'<={e}' for e in edges] + [f'>{edges[-1]}'] if counts[lab]}


def check(path: str, max_pixels: int = 64_000_000) -> dict:
  """Reads every record of a shard, a shard pattern or ArrayRecord files and reports what is there."""
  total, ok, bad = 0, 0, []
  words, languages = [], collections.Counter()
  for rec in _records_of(path):
    total += 1
    if records.is_skipped(rec):
      bad.append((rec['key'], rec[records.SKIP]))
      continue
    caption = ' '.join(str(rec.get('caption') or '').split())
    if not caption:
      bad.append((rec['key'], 'empty_caption'))
      continue
    try:
      transforms.decode_image(rec['image'], max_pixels=max_pixels)
    except transforms.BadImage as e:
      bad.append((rec['key'], e.reason))
      continue
    ok += 1
    words.append(len(caption.split()))
    languages[rec.get('language') or '?'] += 1
  report = {
      'path': path, 'records': total, 'usable': ok,
      'bad_by_reason': dict(collections.Counter(r for _, r in bad)),
      'bad': [{'key': k, 'reason': r} for k, r in bad],
      'caption_words': _histogram(words, (2, 5, 10, 20, 40, 80)),
      'languages': dict(languages.most_common()),
  }
  if not arrayrecord.looks_like(path):
    report['download'] = _download_stats(webdataset.expand(path))
  return report


def _download_stats(shards) -> dict:
  """img2dataset's own counts (rows, successes, failures by kind) summed over the shards' stats files."""
  total = collections.Counter()
  for shard in shards:
    stats = webdataset.download_stats(shard) or {}
    total.update({k: v for k, v in stats.items() if k in ('count', 'successes') or k.startswith('failed_')})
  return dict(total)


def _print_check(report: dict):
  print(f"{report['path']}: {report['records']} records, {report['usable']} usable")
  for title, key in (('img2dataset download', 'download'), ('caption words', 'caption_words'),
                     ('languages', 'languages'), ('bad by reason', 'bad_by_reason')):
    if report.get(key):
      print(f'  {title}: ' + ', '.join(f'{k}: {v}' for k, v in report[key].items()))
  for b in report['bad']:
    print(f"  bad {b['key']}: {b['reason']}")


def parse_convert_args(argv) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='vlp data convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('src', nargs='*', help='img2dataset tar shards (paths, globs, {a..b} ranges)')
  p.add_argument('--out', required=True, help='output directory of .array_record files')
  p.add_argument('--workers', type=int, default=os.cpu_count())
  p.add_argument('--metadata', nargs='*', help='LAION metadata parquet files, joined by URL')
  p.add_argument('--min_similarity', type=float)
  p.add_argument('--min_size', type=int, help='minimum original width and height')
  p.add_argument('--max_punsafe', type=float)
  p.add_argument('--languages', help='comma-separated language codes to keep')
  p.add_argument('--wit', nargs='*', help='WIT TSV(.gz) files')
  p.add_argument('--wit_images', nargs='*', help='img2dataset shards of the WIT image URLs')
  p.add_argument('--wit_pixels', nargs='*', help='Kaggle-style WIT pixel files (url, base64, ...)')
  p.add_argument('--main_image_only', action='store_true')
  p.add_argument('--max_pixels', type=int, default=64_000_000)
  p.add_argument('--quiet', action='store_true', help='no progress bar')
  return p.parse_args(argv)


def main_convert(argv):
  total = convert(parse_convert_args(argv))
  print(json.dumps({k: total[k] for k in ('inputs', 'kept', 'skipped')}))


def main_check(argv):
  p = argparse.ArgumentParser(prog='vlp data check')
  p.add_argument('paths', nargs='+', help='tar shards, shard patterns, .array_record files or directories')
  p.add_argument('--json', action='store_true', help='print one JSON object per path instead')
  p.add_argument('--max_pixels', type=int, default=64_000_000)
  args = p.parse_args(argv)
  for path in args.paths:
    report = check(path, args.max_pixels)
    if args.json:
      print(json.dumps(report, ensure_ascii=False))
    else:
      _print_check(report)


if __name__ == '__main__':
  {'convert': main_convert, 'check': main_check}[sys.argv[1]](sys.argv[2:])
