"""The shape of the code base, checked from its source (ast), not by running it:
no import cycle among vlp's modules (imports inside functions count), no comparison
against a model name outside that model's recipe, short files and functions."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'vlp'
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(ROOT.rglob('*.py')):
    parts = path.relative_to(ROOT.parent).with_suffix('').parts
    out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  """module -> the vlp modules it imports anywhere in its file (function-level imports too).
  `from a import b` is an edge to a.b when that is a module, else to a."""
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules else node.module
                   for a in node.names]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
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


@pytest.mark.parametrize('path', sorted(ROOT.rglob('*.py')), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_functions_are_short(path):
  lines = path.read_text().count('\n')
  assert lines <= MAX_FILE_LINES, f'{path.relative_to(ROOT.parent)}: {lines} lines (max {MAX_FILE_LINES})'
  long = [f'{node.name} ({node.end_lineno - node.lineno + 1} lines)'
          for node in ast.walk(ast.parse(path.read_text()))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, f'{path.relative_to(ROOT.parent)}: functions over {MAX_FUNCTION_LINES} lines: {long}'


def _script_folders_shadowing_stdlib(root: pathlib.Path) -> list[str]:
  """Modules named like a standard-library module, in a folder holding a file that runs as a
  script: Python puts a script's own folder first on sys.path, so `import profile` (cProfile
  does it, and torch imports cProfile) would load the sibling instead of the library's."""
  import sys
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


def test_no_script_folder_shadows_the_standard_library():
  assert _script_folders_shadowing_stdlib(ROOT) == []
