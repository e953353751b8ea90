"""Shard lists from what users type: paths, globs, `{00000..00099}` ranges, directories."""
from __future__ import annotations

from collections.abc import Sequence
import glob
import os
import re

_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')


def _brace_ranges(pattern: str) -> list[str]:
  """'a/{00000..00002}.tar' -> a/00000.tar, a/00001.tar, a/00002.tar (width kept, as in bash)."""
  m = _RANGE.search(pattern)
  if not m:
    return [pattern]
  lo, hi = m.group(1), m.group(2)
  width = len(lo) if lo.startswith('0') or len(lo) == len(hi) else 0
  out = []
  for i in range(int(lo), int(hi) + 1):
    out += _brace_ranges(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
  return out


def expand(patterns: str | Sequence[str], suffix: str) -> list[str]:
  """Paths, globs, `{a..b}` ranges and directories (-> their `*suffix` files) -> files.

  Order is kept as given (sorted within a glob or directory) because it fixes
  which process reads which shard. A pattern that matches nothing is an error:
  a typo must not quietly train on less data.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for pattern in patterns:
    for p in _brace_ranges(os.path.expanduser(pattern)):
      if os.path.isdir(p):
        found = sorted(glob.glob(os.path.join(glob.escape(p), '*' + suffix)))
      elif glob.has_magic(p):
        found = sorted(f for f in glob.glob(p) if os.path.isfile(f))
      else:
        found = [p] if os.path.isfile(p) else []
      if not found:
        raise ValueError(f'{p!r} matches no file' + (f' (no *{suffix} in the directory)'
                                                       if os.path.isdir(p) else ''))
      out += found
  return out
