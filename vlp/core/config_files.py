"""Configs as python files with `get_config(arg)`, and dotted overrides (`--config.a.b=v`)
parsed with the type of the value they replace: a typo is an error naming the key."""
import ast
import difflib
import importlib.util
import os

import ml_collections

from vlp.core.config import ConfigError


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of a config file given by path."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(f'vlp_config_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(arg)
  except AttributeError as e:  # assignment to a key the locked base lacks
    raise ConfigError(f'{path}: {e}') from None


def _all_keys(config, prefix=''):
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _all_keys(v, prefix + k + '.')
    else:
      yield prefix + k


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
  """Applies `a.b=v` strings; `v` is parsed with the type of the current value."""
  for item in overrides:
    key, sep, raw = item.partition('=')
    if not sep:
      raise ConfigError(f'override {item!r} is not of the form key=value')
    parent, _, leaf = key.rpartition('.')
    node = config
    for part in parent.split('.') if parent else []:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      close = difflib.get_close_matches(key, list(_all_keys(config)), n=1)
      hint = f"; did you mean '{close[0]}'?" if close else ''
      raise ConfigError(f"unknown config key '{key}'{hint}")
    node[leaf] = _parse_like(node[leaf], raw, key)
  return config


def _parse_like(current, raw: str, key: str):
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config key '{key}': cannot parse {raw!r}") from None
  if isinstance(current, bool) and not isinstance(value, bool):
    raise ConfigError(f"config key '{key}' expects true/false (True/False), got {raw!r}")
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(f"config key '{key}' expects {type(current).__name__}, got {raw!r}")
  return value
