"""The one record every image-text source yields, and its ArrayRecord bytes.

A record is a dict:
  key:      str, unique within its source (the img2dataset key, a WIT row id)
  image:    bytes, the encoded image file exactly as downloaded (JPEG/PNG/WebP)
  caption:  str
  language: str, '' when unknown
  url:      str, '' when unknown
  meta:     dict of JSON values (width, height, similarity, ...), may be empty

A reader that finds a problem it cannot hand on (a member without its caption,
a caption that is not UTF-8, a truncated shard) yields `skipped(key, reason)`
instead, so that the pipeline counts every loss by reason in one place and
nothing disappears silently.

The bytes written to ArrayRecord are a little-endian uint32 header length, the
UTF-8 JSON header (every field but `image`), then the image bytes unchanged:
no re-encoding, and any reader can take it apart with a dozen lines.
"""
from __future__ import annotations

import json
import struct
from typing import Any

SKIP = '_skip'  # the field that marks a skipped record; its value is the reason
_HEADER = struct.Struct('<I')
FIELDS = ('key', 'image', 'caption', 'language', 'url', 'meta')


def make(key: str, image: bytes, caption: str, language: str = '', url: str = '',
         meta: dict[str, Any] | None = None) -> dict[str, Any]:
  return dict(key=key, image=image, caption=caption, language=language, url=url, meta=meta or {})


def skipped(key: str, reason: str) -> dict[str, Any]:
  """A placeholder for an entry that could not be read, with why."""
  return {'key': key, SKIP: reason}


RETRIED = 'storage_retry'  # the reason of a note, not a loss: counted apart from the skips


def retried(key: str) -> dict[str, Any]:
  """A note that a reader retried the storage once (an outage it rode out) before `key`."""
  return skipped(key, RETRIED)


def is_skipped(record: dict[str, Any]) -> bool:
  return SKIP in record


def encode(record: dict[str, Any]) -> bytes:
  header = json.dumps({k: record[k] for k in FIELDS if k != 'image'},
                      ensure_ascii=False, separators=(',', ':')).encode('utf-8')
  return _HEADER.pack(len(header)) + header + bytes(record['image'])


def decode(data: bytes) -> dict[str, Any]:
  """ArrayRecord bytes -> record; a damaged entry becomes skipped(..., 'bad_record')."""
  try:
    (n,) = _HEADER.unpack_from(data, 0)
    end = _HEADER.size + n
    if end > len(data):
      raise ValueError('header longer than the record')
    record = json.loads(data[_HEADER.size:end].decode('utf-8'))
    record['image'] = data[end:]
    return record
  except (struct.error, ValueError, UnicodeDecodeError):
    return skipped('?', 'bad_record')
