"""`vlp bench data`: the shards it writes are img2dataset shards, and it prints its figures."""
import json

from vlp import cli
from vlp.bench import data as bench_data
from vlp.data import records, webdataset


def test_bench_shards_are_readable_img2dataset_shards(tmp_path):
  paths = bench_data.write_shards(str(tmp_path), num_shards=2, per_shard=3, source_size=40)
  recs = list(webdataset.read_shards(paths))
  assert [r['key'] for r in recs] == [f'{i:09d}' for i in range(6)]
  assert not any(records.is_skipped(r) for r in recs)
  assert all(r['image'][:2] == b'\xff\xd8' and r['caption'] for r in recs)  # JPEG, with a caption


def test_cli_prints_images_per_second(capsys):
  cli.main(['bench', 'data', '--workers', '0', '--shards', '2', '--per_shard', '8', '--batch', '4',
            '--batches', '2', '--warmup', '1', '--repeats', '2', '--source_size', '48', '--image_size', '16',
            '--shuffle_window', '8'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['vlp_webdataset_images_per_sec'] > 0 and out['vlp_arrayrecord_images_per_sec'] > 0
  assert out['repeats'] == 2 and 'ratio_webdataset_input' not in out  # no reference asked for
