"""A webdataset shard that becomes unreadable during a run is skipped and counted, not a crash."""
from data_fixtures import sample, truncate, write_shard

from vlp.data import records, webdataset


def _skips(recs):
  return [(r['key'], r[records.SKIP]) for r in recs if records.is_skipped(r)]


def test_a_shard_deleted_or_truncated_after_listing_is_skipped_and_counted(tmp_path):
  paths = [write_shard(str(tmp_path), i, [sample(10 * i + j) for j in range(4)]) for i in range(3)]
  listed = webdataset.expand(str(tmp_path))
  assert listed == sorted(paths)
  (tmp_path / '00001.tar').unlink()  # gone between the listing and its turn
  truncate(paths[2], 0.5)
  recs = list(webdataset.read_shards(listed))
  assert ('00001.tar:', 'unreadable_shard') in _skips(recs)
  assert any(reason == 'truncated_shard' for _, reason in _skips(recs))
  assert sum(not records.is_skipped(r) for r in recs) >= 4  # shard 0 whole, what came before the cut
