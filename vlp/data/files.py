"""Shard lists from what users type: paths, globs, `{00000..00099}` ranges, directories,
local or remote (gs://...: through vlp.core.paths)."""
from __future__ import annotations

from collections.abc import Sequence

from vlp.core import paths


def _brace_ranges(pattern: str) -> list[str]:
  """'a/{00000..00002}.tar' -> a/00000.tar, a/00001.tar, a/00002.tar (width kept, as in bash)."""
  return paths.brace_ranges(pattern)


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
    for p in _brace_ranges(paths.normalize(pattern)):
      if paths.has_magic(p):
        is_dir = False
        found = [f for f in paths.glob(p) if paths.is_remote(f) or paths.isfile(f)]
      else:
        is_dir = paths.isdir(p)
        if is_dir:
          found = paths.glob(paths.join(p, '*' + suffix))
        else:
          found = [p] if paths.isfile(p) else []
      if not found:
        raise ValueError(f'{p!r} matches no file' + (f' (no *{suffix} in the directory)' if is_dir else ''))
      out += found
  return out
