"""WIT (Wikipedia-based Image Text) as Google released it: TSV rows joined with image bytes.

The TSVs (`wit_v1.train.all-0000N-of-00010.tsv.gz`) have a header row and
one row per (page, image): language, page_url, image_url, page_title,
section_title, hierarchical_section_title, caption_reference_description,
caption_attribution_description, caption_alt_text_description, mime_type,
original_height, original_width, is_main_image, attribution_passes_lang_id,
page_changed_recently, context_page_description, context_section_description.
Fields are quoted CSV (a description may hold newlines and tabs), so rows are
read with the csv module, never split on lines; booleans are 'true'/'false'.

The TSVs hold URLs, not pixels. The bytes come from img2dataset shards
downloaded from the image_url column (`--wit_images`), or from the pixel
files of the Kaggle WIT competition (`--wit_pixels`: gzipped, no header,
`image_url <TAB> base64 bytes <TAB> metadata_url` per line):
  vlp data convert --wit wit_v1.train.all-00000-of-00010.tsv.gz \
      --wit_images 'wit_images/*.tar' --languages en,de --out wit_ar

Rows that do not become records are yielded as skipped, with the reason:
bad_row (wrong field count, a boolean that is not true/false), bad_utf8,
language_filtered, not_main_image, empty_caption, missing_image (no bytes for
the URL), truncated_file (a .gz cut short: the rest of the file).
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator, Mapping, Sequence
import csv
import dataclasses
import gzip
import io
import re
import sys
import zlib

from vlp.core import paths as vpaths
from vlp.data import records, webdataset

REQUIRED = ('language', 'image_url', 'caption_reference_description', 'caption_attribution_description',
            'caption_alt_text_description', 'is_main_image')
CAPTION_FIELDS = {'reference': 'caption_reference_description',
                  'attribution': 'caption_attribution_description',
                  'alt_text': 'caption_alt_text_description'}
# Commons attribution descriptions start with the language's name as Commons
# labels it: 'English: Sunset over...', 'Deutsch: Blick auf...', 'Simple
# English: ...', 'Norsk bokmål: ...'. Up to three words of letters (any
# script, joined by spaces or hyphens, maybe in parentheses), at most 30
# characters and no digit, then ': ', are taken for that label. 'Map: 1900s' loses 'Map: ' too;
# attribution is a fallback after the reference description, so that is rare
# and cheap, while the label would spoil every caption that has one.
_LANGUAGE_LABEL = re.compile(r'^([^\W\d_]+(?:[ -]\(?[^\W\d_]+\)?){0,2}): ')
_MAX_LABEL = 30

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # context descriptions run to 100s of KB


def _open_text(path: str):
  """Text of a plain or gzipped file (by its magic bytes, not its name)."""
  raw = vpaths.open(path, 'rb')  # local or remote
  gz = raw.read(2) == b'\x1f\x8b'
  raw.seek(0)
  raw = gzip.GzipFile(fileobj=raw, mode='rb') if gz else raw
  # surrogateescape: a stray non-UTF-8 byte spoils its row (bad_utf8), not the file.
  return io.TextIOWrapper(raw, encoding='utf-8', errors='surrogateescape', newline='')


def _parse_bool(value: str) -> bool:
  v = value.strip().lower()
  if v not in ('true', 'false'):
    raise ValueError(f'not a boolean: {value!r}')
  return v == 'true'


def _int_or_none(value: str) -> int | None:
  try:
    return int(float(value))
  except (TypeError, ValueError):
    return None


def _has_surrogates(s: str) -> bool:
  try:
    s.encode('utf-8')
    return False
  except UnicodeEncodeError:
    return True


def strip_language_label(text: str) -> str:
  m = _LANGUAGE_LABEL.match(text)
  return text[m.end():] if m and len(m.group(1)) <= _MAX_LABEL else text


@dataclasses.dataclass(frozen=True)
class CaptionPolicy:
  """Which caption a WIT row gets, and which rows are kept.

  `order` names the caption fields to try, first non-empty wins: 'reference'
  (the caption under the image on the page), 'attribution' (the Commons file
  description, its language label stripped), 'alt_text'.
  """
  order: tuple[str, ...] = ('reference', 'attribution', 'alt_text')
  languages: tuple[str, ...] | None = None  # None: every language
  main_image_only: bool = False

  def __post_init__(self):
    for name in self.order:
      if name not in CAPTION_FIELDS:
        raise ValueError(f'unknown WIT caption field {name!r}; known: {", ".join(CAPTION_FIELDS)}')

  def caption(self, row: Mapping[str, str]) -> str:
    for name in self.order:
      text = ' '.join((row.get(CAPTION_FIELDS[name]) or '').split())
      if name == 'attribution':
        text = strip_language_label(text)
      if text:
        return text
    return ''


def _row_record(key: str, row: dict, policy: CaptionPolicy) -> dict:
  if None in row or None in row.values():  # more fields than the header, or fewer
    return records.skipped(key, 'bad_row')
  try:
    main, lang_id = _parse_bool(row['is_main_image']), _parse_bool(row.get('attribution_passes_lang_id') or 'false')
  except ValueError:
    return records.skipped(key, 'bad_row')
  language = row['language'].strip()
  if policy.languages is not None and language not in policy.languages:
    return records.skipped(key, 'language_filtered')
  if policy.main_image_only and not main:
    return records.skipped(key, 'not_main_image')
  caption = policy.caption(row)
  if _has_surrogates(caption) or _has_surrogates(row['image_url']):
    return records.skipped(key, 'bad_utf8')
  if not caption:
    return records.skipped(key, 'empty_caption')
  meta = {'page_url': row.get('page_url', ''), 'page_title': row.get('page_title', ''),
          'section_title': row.get('section_title', ''), 'mime_type': row.get('mime_type', ''),
          'original_height': _int_or_none(row.get('original_height')),
          'original_width': _int_or_none(row.get('original_width')),
          'is_main_image': main, 'attribution_passes_lang_id': lang_id}
  meta = {k: (v.encode('utf-8', 'replace').decode() if isinstance(v, str) and _has_surrogates(v) else v)
          for k, v in meta.items()}
  return records.make(key, b'', caption, language, row['image_url'].strip(), meta)


def read_tsv(path: str, policy: CaptionPolicy = CaptionPolicy()) -> Iterator[dict]:
  """Records (image still empty: see `join`) of one WIT TSV, skipped ones included."""
  name = vpaths.basename(path).split('.tsv')[0]
  row_number = 0
  with _open_text(path) as f:
    reader = csv.DictReader(f, delimiter='\t')
    try:
      header = reader.fieldnames or []
      missing = [c for c in REQUIRED if c not in header]
      if missing:
        raise ValueError(f'{path}: not a WIT TSV, the header lacks {", ".join(missing)}')
      for row_number, row in enumerate(reader):
        yield _row_record(f'{name}:{row_number}', row, policy)
    except (EOFError, zlib.error, gzip.BadGzipFile):
      yield records.skipped(f'{name}:{row_number}', 'truncated_file')


def join(recs: Iterable[dict], images: Mapping[str, bytes]) -> Iterator[dict]:
  """Fills in each record's image bytes by its URL; no bytes -> skipped 'missing_image'."""
  for rec in recs:
    if records.is_skipped(rec):
      yield rec
    elif rec['url'] in images:
      yield {**rec, 'image': images[rec['url']]}
    else:
      yield records.skipped(rec['key'], 'missing_image')


def images_from_shards(paths: Sequence[str]) -> dict[str, bytes]:
  """image URL -> bytes from img2dataset shards of WIT image URLs (unreadable entries left out)."""
  return {r['url']: r['image'] for path in paths for r in webdataset.read_shard(path)
          if not records.is_skipped(r) and r['url']}


def read_pixel_file(path: str) -> Iterator[tuple[str, bytes | None]]:
  """(image_url, bytes) of a Kaggle-style pixel file; None for a field that is not base64."""
  with _open_text(path) as f:
    try:
      for row in csv.reader(f, delimiter='\t'):
        if len(row) < 2:
          continue
        try:
          yield row[0], base64.b64decode(row[1], validate=True)
        except (binascii.Error, ValueError):
          yield row[0], None
    except (EOFError, zlib.error, gzip.BadGzipFile):
      return  # the URLs after the cut come out of `join` as missing_image


def images_from_pixel_files(paths: Sequence[str]) -> dict[str, bytes]:
  """image URL -> bytes; undecodable entries are left out (their rows become missing_image)."""
  return {url: data for path in paths for url, data in read_pixel_file(path) if data is not None}
