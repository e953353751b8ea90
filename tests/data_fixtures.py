"""Small real-format web data for tests: img2dataset shards, LAION parquet, bad inputs.

The layout is img2dataset's (`writer.py` of its webdataset output): shard
`NNNNN.tar` with members `KEY.jpg`, `KEY.txt`, `KEY.json` in that order for
each key, where KEY is the zero-padded shard id followed by the zero-padded
sample index; beside it `NNNNN.parquet` with a row per input URL (failed
downloads too) and `NNNNN_stats.json`.
"""
from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq


def jpeg(seed: int, size=(40, 32), quality=90) -> bytes:
  """A real JPEG of smooth random colour (decodes like a photo, not like noise)."""
  rng = np.random.default_rng(seed)
  corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
  w, h = size
  y, x = np.linspace(0, 1, h)[:, None, None], np.linspace(0, 1, w)[None, :, None]
  pixels = (corners[0, 0] * (1 - y) * (1 - x) + corners[0, 1] * (1 - y) * x
            + corners[1, 0] * y * (1 - x) + corners[1, 1] * y * x)
  out = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(out, 'JPEG', quality=quality)
  return out.getvalue()


def png_bomb(width=20_000, height=20_000) -> bytes:
  """A PNG whose header claims width x height pixels: a few bytes that would decode to GBs."""
  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
          + chunk(b'IEND', b''))


def sample(i: int, caption: str | bytes | None = None, image: bytes | None = None, **json_fields) -> dict:
  """One img2dataset sample; caption=None leaves out the .txt, image=b'' the .jpg."""
  return {'image': jpeg(i) if image is None else image,
          'caption': f'a photo number {i}' if caption is None else caption,
          'json': {'similarity': 0.3, 'punsafe': 0.01, **json_fields}}


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
  tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: str, shard_id: int, samples: list[dict], *, no_caption: tuple[int, ...] = (),
                failed: int = 0) -> str:
  """Writes NNNNN.tar + NNNNN.parquet + NNNNN_stats.json; returns the tar path.

  Indices in `no_caption` get no .txt member; `failed` extra input rows are
  failed downloads that appear only in the parquet and the stats.
  """
  os.makedirs(out_dir, exist_ok=True)
  name = f'{shard_id:05d}'
  rows = []
  with tarfile.open(os.path.join(out_dir, name + '.tar'), 'w') as tar:
    for i, s in enumerate(samples):
      key = f'{shard_id:05d}{i:04d}'
      url = f'https://example.com/{key}.jpg'
      caption = s['caption'] if isinstance(s['caption'], bytes) else s['caption'].encode('utf-8')
      meta = {'url': url, 'key': key, 'status': 'success', 'error_message': None,
              'width': 40, 'height': 32, 'original_width': 400, 'original_height': 320,
              'caption': caption.decode('utf-8', 'replace'), **s['json']}
      if s['image']:
        _add(tar, key + '.jpg', s['image'])
      if i not in no_caption:
        _add(tar, key + '.txt', caption)
      _add(tar, key + '.json', json.dumps(meta, indent=4).encode())
      rows.append(meta)
  for j in range(failed):
    rows.append({'url': f'https://example.com/gone{j}.jpg', 'key': f'{shard_id:05d}{len(samples) + j:04d}',
                 'status': 'failed_to_download', 'error_message': 'HTTP Error 404'})
  columns = sorted({k for r in rows for k in r})
  table = pa.table({c: [r.get(c) for r in rows] for c in columns})
  pq.write_table(table, os.path.join(out_dir, name + '.parquet'))
  with open(os.path.join(out_dir, name + '_stats.json'), 'w') as f:
    json.dump({'count': len(rows), 'successes': len(samples), 'failed_to_download': failed,
               'failed_to_resize': 0, 'status_dict': {'success': len(samples)}}, f)
  return os.path.join(out_dir, name + '.tar')


def truncate(path: str, keep: float) -> None:
  """Cuts a file to the first `keep` fraction of its bytes (a download that died)."""
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:int(len(data) * keep)])


def write_laion_metadata(path: str, rows: list[dict]) -> str:
  """A LAION-400M style metadata parquet (upper-case URL/TEXT/WIDTH/HEIGHT, then similarity...)."""
  pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in rows[0]}), path)
  return path


WIT_HEADER = ('language', 'page_url', 'image_url', 'page_title', 'section_title', 'hierarchical_section_title',
              'caption_reference_description', 'caption_attribution_description',
              'caption_alt_text_description', 'mime_type', 'original_height', 'original_width',
              'is_main_image', 'attribution_passes_lang_id', 'page_changed_recently',
              'context_page_description', 'context_section_description')


def wit_row(i: int, **fields) -> dict:
  """A WIT row as released: every value a string, booleans 'true'/'false'."""
  return {'language': 'en', 'page_url': f'https://en.wikipedia.org/wiki/Page_{i}',
          'image_url': f'https://upload.wikimedia.org/wikipedia/commons/a/ab/File_{i}.jpg',
          'page_title': f'Page {i}', 'section_title': '', 'hierarchical_section_title': f'Page {i}',
          'caption_reference_description': f'reference caption {i}',
          'caption_attribution_description': f'English: attribution {i}',
          'caption_alt_text_description': '', 'mime_type': 'image/jpeg', 'original_height': '480',
          'original_width': '640', 'is_main_image': 'true', 'attribution_passes_lang_id': 'true',
          'page_changed_recently': 'false', 'context_page_description': f'Page {i} is a page.',
          'context_section_description': '', **fields}


def _text_out(path: str, compress: bool):
  return gzip.open(path, 'wt', encoding='utf-8', newline='') if compress else open(path, 'w', newline='')


def write_wit_tsv(path: str, rows: list[dict], compress: bool = True) -> str:
  """The released layout: header row, tab-separated, csv quoting for fields with tabs/newlines/quotes."""
  with _text_out(path, compress) as f:
    w = csv.writer(f, delimiter='\t', lineterminator='\n')
    w.writerow(WIT_HEADER)
    for row in rows:
      w.writerow([row[c] for c in WIT_HEADER])
  return path


def write_pixel_file(path: str, images: list[tuple[str, bytes | str]], compress: bool = True) -> str:
  """Kaggle WIT pixel file: no header, `image_url TAB base64 TAB metadata_url` (a str is written as is)."""
  with _text_out(path, compress) as f:
    for url, data in images:
      b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
      f.write(f'{url}\t{b64}\thttps://commons.wikimedia.org/w/api.php?titles={url.rsplit("/", 1)[-1]}\n')
  return path
