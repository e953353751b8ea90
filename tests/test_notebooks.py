"""The Colab notebooks, executed end to end on CPU with small settings (environment variables)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _execute(name, tmp_path):
  import nbclient
  import nbformat
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}}).execute()
  nbformat.write(nb, str(tmp_path / name))  # executed copy, for a look when a test fails
  return nb


def _outputs(nb):
  return '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))


@pytest.mark.slow
def test_quickstart_then_evaluate(tmp_path, monkeypatch):
  """quickstart trains, plots and exports; evaluate loads that export and shows retrieval and a query."""
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  monkeypatch.setenv('VLP_STEPS', '8')
  monkeypatch.setenv('VLP_SMALL', '1')
  monkeypatch.setenv('VLP_WORKDIR', str(tmp_path / 'wd'))
  nb = _execute('quickstart.ipynb', tmp_path)
  images = [o for c in nb.cells for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(images) == 1  # the curves
  assert os.path.exists(tmp_path / 'wd' / 'export' / 'image_encoder.jax_exported')
  monkeypatch.setenv('VLP_EXPORT', str(tmp_path / 'wd' / 'export'))
  monkeypatch.setenv('VLP_EVAL_IMAGES', '40')
  nb = _execute('evaluate.ipynb', tmp_path)
  out = _outputs(nb)
  assert 'step 8, float32 weights' in out and 'image->text' in out and "'de':" in out
  grids = [o for c in nb.cells for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(grids) == 1  # the query's top images
