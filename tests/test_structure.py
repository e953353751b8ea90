"""The shape of the code base, checked from its source (ast), not by running it.

vlp's folders are layers (LAYERS): a module may import its own folder and the layers
before its own, never a sibling of its layer or a layer after it; imports inside
functions count. Besides: no import cycle among modules, the models import no input
code (no PIL), no comparison against a model name outside that model's recipe, and no
script folder shadows the standard library.

`python tests/test_structure.py` prints the import graph between the folders, and any
import against the order.
"""
import ast
import collections
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'vlp'

# Bottom to top. A unit is a folder of vlp/ or a module at its top; units in one layer are
# independent of each other. 'vlp' is the package's __init__ (vlp.load_pretrained).
LAYERS = (
    ('core',),  # config schema, overrides, paths, mesh and shardings, distributed start-up, compiler flags
    ('models', 'losses'),  # pure Flax modules and their FLOPs; the contrastive losses
    ('data',),  # sources, transforms, tokenizers, pipelines: no model knowledge
    ('recipes',),  # one package per model family
    ('validation',),  # the one validation pass over a config
    ('plan',),  # variants, batch specs, abstract params
    ('checkpoint',),  # Orbax only
    ('workdir',),  # the workdir's layout, identity, hosts, metrics files, reading a checkpoint's params
    ('eval',),
    ('train',),
    ('export', 'pretrained'),
    ('interop',),  # weights in and out of other frameworks
    ('compile',),  # tools
    ('bench',),
    ('cli',),
    ('vlp',),
)
# Third-party input code the models must not import (they take arrays).
NOT_IN_MODELS = ('PIL', 'grain', 'tensorflow_datasets', 'array_record', 'sentencepiece', 'tokenizers')


def _modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(root.rglob('*.py')):
    parts = path.relative_to(root.parent).with_suffix('').parts
    out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def _imports(path: pathlib.Path):
  """(line, imported dotted name, the names it imports) of every import anywhere in a file."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name, ()
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      yield node.lineno, node.module, tuple(a.name for a in node.names)


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, dict[str, int]]:
  """module -> {vlp module it imports: line}. `from a import b` is an edge to a.b when that
  is a module, else to a."""
  graph = {}
  for name, path in modules.items():
    edges = {}
    for line, module, names in _imports(path):
      targets = [f'{module}.{n}' if f'{module}.{n}' in modules else module for n in names] or [module]
      edges.update({t: line for t in targets if t in modules and t != name})
    graph[name] = edges
  return graph


def unit_of(module: str) -> str:
  """'vlp.data.pipeline' -> 'data', 'vlp.plan' -> 'plan', 'vlp' -> 'vlp'."""
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph, layers=LAYERS) -> list[str]:
  """'a.b:LINE imports c.d (layer X may not import layer Y)' for every import against the order;
  a unit not in any layer is a violation too (add it to LAYERS where it belongs)."""
  rank = {u: i for i, layer in enumerate(layers) for u in layer}
  out = []
  for module, edges in sorted(graph.items()):
    a = unit_of(module)
    if a not in rank:
      out.append(f'{module}: its unit {a!r} is in no layer')
      continue
    for target, line in sorted(edges.items()):
      b = unit_of(target)
      if a != b and rank.get(b, len(layers)) >= rank[a]:
        out.append(f'{module}:{line} imports {target} ({a} may not import {b})')
  return out


def unit_graph(graph) -> dict[str, set[str]]:
  out = collections.defaultdict(set)
  for module, edges in graph.items():
    out[unit_of(module)].update(unit_of(t) for t in edges if unit_of(t) != unit_of(module))
  return out


def cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert cycles({'a': {'b'}, 'b': set()}) == []


def test_no_import_cycle_among_vlp_modules():
  found = cycles(import_graph(_modules()))
  assert not found, f'{len(found)} import cycle(s): {found}'


def test_the_layer_check_finds_an_import_against_the_order(tmp_path):
  """A function-level import of a higher layer, a sibling of the same layer and a unit in no
  layer are each found; an import of a lower layer and of the module's own folder are not."""
  pkg = tmp_path / 'vlp'
  for f, text in {'core/__init__.py': '', 'core/a.py': '',
                  'models/__init__.py': '', 'models/m.py': 'from vlp.core import a\nfrom vlp.models import n\n',
                  'models/n.py': 'def f():\n  from vlp.data import d\n',
                  'losses.py': 'from vlp.models import m\n',
                  'data/__init__.py': '', 'data/d.py': 'import vlp.core.a\n',
                  'stray.py': ''}.items():
    (pkg / f).parent.mkdir(parents=True, exist_ok=True)
    (pkg / f).write_text(text)
  found = layer_violations(import_graph(_modules(pkg)))
  assert found == ['vlp.losses:1 imports vlp.models.m (losses may not import models)',
                   'vlp.models.n:2 imports vlp.data.d (models may not import data)',
                   "vlp.stray: its unit 'stray' is in no layer"]


def test_folders_import_one_way():
  found = layer_violations(import_graph(_modules()))
  assert not found, f'{len(found)} import(s) against the layer order:\n' + '\n'.join(found)


def test_the_models_import_no_input_code():
  hits = [f'{p.relative_to(ROOT.parent)}:{line} imports {module}'
          for p in sorted((ROOT / 'models').rglob('*.py')) for line, module, _ in _imports(p)
          if module.split('.')[0] in NOT_IN_MODELS]
  assert not hits, '; '.join(hits)


def model_name_comparisons(source: str, names) -> list[int]:
  """Lines of every comparison (==, !=, in, not in) against a string that is one of `names`."""
  hits = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Compare):
      values = [node.left, *node.comparators]
      for v in list(values):  # `x in ('albef', 'imp')`
        if isinstance(v, (ast.Tuple, ast.List, ast.Set)):
          values += v.elts
      if any(isinstance(v, ast.Constant) and v.value in names for v in values):
        hits.append(node.lineno)
  return hits


def test_the_model_name_finder_finds_comparisons():
  source = "if config.model.name == 'albef':\n  pass\nx = name in ('imp', 'other')\ny = 'align'\n"
  assert model_name_comparisons(source, ('align', 'albef', 'imp')) == [1, 3]


def test_no_model_name_comparison_outside_its_recipe():
  from vlp import recipes
  hits = []
  for path in sorted(ROOT.rglob('*.py')):
    own = {n for n in recipes.BUILTIN if (ROOT / 'recipes' / n) in path.parents or path == ROOT / 'models' / f'{n}.py'}
    hits += [f'{path.relative_to(ROOT.parent)}:{line}'
             for line in model_name_comparisons(path.read_text(), set(recipes.BUILTIN) - own)]
  assert not hits, 'shared code asks which model it runs: ' + '; '.join(hits)


def _script_folders_shadowing_stdlib(root: pathlib.Path) -> list[str]:
  """Modules named like a standard-library module, in a folder holding a file that runs as a
  script: Python puts a script's own folder first on sys.path, so `import profile` (cProfile
  does it, and torch imports cProfile) would load the sibling instead of the library's."""
  script_dirs = {p.parent for p in root.rglob('*.py') if "__name__ == '__main__'" in p.read_text()
                 or '__name__ == "__main__"' in p.read_text()}
  return sorted(str(p.relative_to(root.parent)) for d in script_dirs for p in d.glob('*.py')
                if p.stem in sys.stdlib_module_names)


def test_the_shadow_finder_finds_a_shadow(tmp_path):
  (tmp_path / 'pkg').mkdir()
  (tmp_path / 'pkg' / 'run_me.py').write_text("if __name__ == '__main__':\n  pass\n")
  (tmp_path / 'pkg' / 'profile.py').write_text('')
  (tmp_path / 'pkg' / 'steps.py').write_text('')
  assert _script_folders_shadowing_stdlib(tmp_path / 'pkg') == ['pkg/profile.py']


@pytest.mark.parametrize('folder', ['vlp', 'benchmarks'])
def test_no_script_folder_shadows_the_standard_library(folder):
  assert _script_folders_shadowing_stdlib(ROOT.parent / folder) == []


def test_the_package_imports_no_torch_script():
  """The torch references run in their own environment (benchmarks/), never imported by vlp."""
  hits = [f'{p.relative_to(ROOT.parent)}:{line}' for p in sorted(ROOT.rglob('*.py'))
          for line, module, _ in _imports(p) if module.split('.')[0] in ('torch', 'open_clip', 'benchmarks')]
  assert not hits, '; '.join(hits)


def main(root: pathlib.Path = ROOT):
  """Prints the folder import graph of a tree, its folder cycles and the imports against LAYERS."""
  graph = import_graph(_modules(root))
  units = unit_graph(graph)
  order = [u for layer in LAYERS for u in layer]
  for u in sorted(set(units) | {unit_of(m) for m in graph}, key=lambda u: (u not in order, order.index(u) if u in order else u)):
    print(f'{u:<14} -> {", ".join(sorted(units.get(u, ()))) or "-"}')
  loops = cycles({u: units.get(u, set()) for u in set(units) | {unit_of(m) for m in graph}})
  print(f'\nfolders in an import cycle: {loops or "none"}')
  found = layer_violations(graph)
  print(f'{len(found)} import(s) against the layer order' + (':' if found else ''))
  print('\n'.join(found))


if __name__ == '__main__':  # python tests/test_structure.py [path/to/vlp]
  main(pathlib.Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
