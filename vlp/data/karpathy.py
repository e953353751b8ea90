"""Karpathy-split caption files (`dataset_coco.json`, `dataset_flickr30k.json`) with their image
folder, local or remote: the usual COCO and Flickr30k retrieval test sets."""
import json

from vlp.core import paths
from vlp.data import records


class KarpathySource:
  """One split of a Karpathy-split caption file (`dataset_coco.json`,
  `dataset_flickr30k.json`): `images[]` with `split`, `filename`, optional
  `filepath` (COCO's 'val2014') and `sentences[].raw`. Images are read from
  `image_dir/[filepath/]filename`; a random-access source with `captions(i)`."""

  def __init__(self, path: str, image_dir: str, split: str = 'test'):
    with paths.open(path) as f:  # local or remote (gs://), as the images
      entries = json.load(f)['images']
    self.entries = [e for e in entries if e['split'] == split]
    if not self.entries:
      splits = sorted({e['split'] for e in entries})
      raise ValueError(f'{path}: no image of split {split!r}; splits there: {splits}')
    self.path, self.image_dir, self.split = path, image_dir, split

  def __len__(self):
    return len(self.entries)

  def file(self, index: int) -> str:
    e = self.entries[index]
    return paths.join(self.image_dir, *([e['filepath']] if e.get('filepath') else []), e['filename'])

  def __getitem__(self, index: int) -> dict:
    key = self.entries[index]['filename']
    try:
      image = paths.read_bytes(self.file(index))
    except FileNotFoundError:
      return records.skipped(key, 'missing_image')
    return records.make(key, image, self.entries[index]['sentences'][0]['raw'])

  def captions(self, index: int) -> list[tuple[str, str]]:
    return [('', s['raw']) for s in self.entries[index]['sentences']]

  def __repr__(self):
    return f'KarpathySource({self.path!r}, split={self.split!r}, {len(self)} images)'
