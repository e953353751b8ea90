"""Recipes: one per model family, looked up by `config.model.name`.

The built-in ones are packages of this folder (align, albef, imp, bert),
imported on first use; a recipe that lives elsewhere joins with
`register(recipe)` (docs/models.md, "Adding a model").
"""
import importlib

from vlp.core import config as config_lib
from vlp.core.config import ConfigError
from vlp.recipes.base import Recipe

BUILTIN = ('align', 'albef', 'imp', 'bert')
_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
  _REGISTRY[recipe.name] = recipe
  return recipe


def get(name: str) -> Recipe:
  if name not in _REGISTRY and name in BUILTIN:
    register(importlib.import_module(f'vlp.recipes.{name}').RECIPE)
  if name not in _REGISTRY:
    known = ', '.join(sorted(set(BUILTIN) | set(_REGISTRY)))
    raise ConfigError(f"config key 'model.name': unknown model {name!r}; known: {known}")
  return _REGISTRY[name]


def base_config(name: str = 'align'):
  """The locked base config of a model family: the common keys and the recipe's own."""
  return config_lib.base_config(name, get(name).config_sections())


__all__ = ['BUILTIN', 'Recipe', 'base_config', 'get', 'register']
