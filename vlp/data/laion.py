"""LAION metadata: the parquet files of URL/TEXT/size/similarity rows, and filters on them.

LAION releases one row per image: URL, TEXT, WIDTH, HEIGHT, similarity (the
CLIP image-text cosine it was filtered on), punsafe, pwatermark, LICENSE,
and LANGUAGE in the multilingual sets. img2dataset copies the columns it was
asked to keep into each image's .json; `read_metadata` gives the others by
URL so that `vlp data convert --metadata ...` can filter on them.

Column names differ in case between releases (LAION-400M writes `URL`,
LAION-5B `url`), so they are lower-cased on reading; `text` becomes `caption`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import dataclasses

import pyarrow.parquet as pq

from vlp.core import paths as vpaths
from vlp.data import records

# The columns read from metadata (the others, e.g. hashes, are not needed to filter).
COLUMNS = ('url', 'text', 'caption', 'width', 'height', 'original_width', 'original_height', 'similarity',
           'punsafe', 'pwatermark', 'language', 'license', 'nsfw')


def read_metadata(paths: Sequence[str]) -> dict[str, dict]:
  """url -> {column: value} over LAION metadata parquet files (lower-case column names)."""
  rows = {}
  for path in paths:
    with vpaths.open(path, 'rb') as f:  # local or remote (gs://)
      table = pq.read_table(f)
    names = {n.lower(): n for n in table.column_names}
    if 'url' not in names:
      raise ValueError(f'{path}: no URL column (columns: {", ".join(table.column_names)})')
    cols = {c: table.column(names[c]).to_pylist() for c in COLUMNS if c in names}
    for i, url in enumerate(cols.pop('url')):
      row = {('caption' if c == 'text' else c): v[i] for c, v in cols.items() if v[i] is not None}
      rows[url] = row
  return rows


@dataclasses.dataclass(frozen=True)
class Filter:
  """Which records to keep when converting; None switches a criterion off.

  A record lacking the field a criterion needs is dropped with its own reason
  (`no_similarity`, ...): keeping it would let unfiltered data in unseen.
  """
  min_similarity: float | None = None
  min_width: int | None = None
  min_height: int | None = None
  max_punsafe: float | None = None
  languages: tuple[str, ...] | None = None

  def reason(self, record: dict) -> str | None:
    """None to keep the record, else why it is dropped."""
    meta = record.get('meta', {})

    def field(*names):
      return next((meta[n] for n in names if meta.get(n) is not None), None)

    if self.min_similarity is not None:
      sim = field('similarity')
      if sim is None:
        return 'no_similarity'
      if sim < self.min_similarity:
        return 'low_similarity'
    if self.min_width is not None or self.min_height is not None:
      # The size before img2dataset resized it, when it recorded one.
      w, h = field('original_width', 'width'), field('original_height', 'height')
      if w is None or h is None:
        return 'no_size'
      if w < (self.min_width or 0) or h < (self.min_height or 0):
        return 'too_small'
    if self.max_punsafe is not None:
      p = field('punsafe')
      if p is None:
        return 'no_punsafe'
      if p > self.max_punsafe:
        return 'unsafe'
    if self.languages is not None:
      lang = record.get('language') or field('language')
      if lang not in self.languages:
        return 'language_filtered'
    return None


def apply_filter(recs: Iterable[dict], flt: Filter) -> Iterator[dict]:
  """Records the filter keeps; the others become skipped(key, reason)."""
  for rec in recs:
    why = None if records.is_skipped(rec) else flt.reason(rec)
    yield records.skipped(rec['key'], why) if why else rec
