"""An image folder for zero-shot classification: ROOT/<class>/<image>, local or on an object
store."""
import numpy as np

from vlp.core import paths

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')


def spread(n: int, limit: int) -> np.ndarray:
  """Up to `limit` indices spread evenly over range(n): files sorted by class
  keep every class in a subset."""
  return np.arange(n) if not limit or limit >= n else np.linspace(0, n - 1, limit).round().astype(int)


def image_folder(root: str, limit: int = 0):
  """(files, labels, class_names) of ROOT/<class>/<image>: classes are the sorted
  subfolders, named by their folder name with '_' read as a space."""
  classes = _subfolders(root)
  if not classes:
    raise ValueError(f'{root}: no class subfolders')
  files, labels = [], []
  for c, name in enumerate(classes):
    for f in paths.listdir(paths.join(root, name)):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(paths.join(root, name, f))
        labels.append(c)
  keep = spread(len(files), limit)
  return [files[i] for i in keep], np.asarray(labels)[keep], [c.replace('_', ' ') for c in classes]


def _subfolders(root: str) -> list[str]:
  """The class folders of ROOT: local subdirectories, or on an object store the prefixes
  that hold objects (an object store has no empty folders)."""
  if paths.is_remote(root):
    return sorted({paths.basename(paths.dirname(f)) for f in paths.glob(paths.join(root, '*', '*'))})
  return sorted(d for d in paths.listdir(root) if paths.isdir(paths.join(root, d)))
