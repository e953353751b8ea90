"""What vlp never does with untrusted bytes: unpickle them, write tar members anywhere
(absolute or `..` names are skipped and counted), or execute a workdir's config."""
import ast
import io
import os
import re
import tarfile

import pytest
from data_fixtures import jpeg

from vlp.core import paths
from vlp.data import records, webdataset
from vlp.workdir import identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources():
  for d, _, names in os.walk(os.path.join(ROOT, 'vlp')):
    for n in names:
      if n.endswith('.py'):
        with open(os.path.join(d, n)) as f:
          yield os.path.relpath(os.path.join(d, n), ROOT), f.read()


# the one unpickler in vlp: `vlp import --allow-pickle`'s, whose find_class rebuilds only dicts,
# tensors and storages (tests/test_torch_pickle.py)
RESTRICTED_UNPICKLER = ('vlp/interop/torch_pickle.py', 'class _RestrictedUnpickler(pickle.Unpickler')


def test_nothing_is_unpickled():
  # np.load is fine: it refuses pickled objects unless allow_pickle=True
  unsafe = re.compile(r'\b_?pickle\.loads?\(|\bcloudpickle\.loads?\(|allow_pickle\s*=\s*True|\btorch\.load\(|'
                      r'\bjoblib\.load\(|\bdill\.loads?\(|\bmarshal\.loads?\(|\bshelve\.open\(|'
                      r'\bfrom (?:c|_)?pickle import\b|class \w+\(pickle\.Unpickler|\b(?:pickle\.)?_?Unpickler\b')
  found = [(name, m.group(0)) for name, text in _sources() for m in unsafe.finditer(text)]
  assert found == [RESTRICTED_UNPICKLER]
  tree = ast.parse(open(os.path.join(ROOT, RESTRICTED_UNPICKLER[0])).read())
  cls, = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == '_RestrictedUnpickler']
  assert {'find_class', 'persistent_load'} <= {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}


def test_tar_members_with_absolute_or_dotdot_names_are_skipped_and_written_nowhere(tmp_path, monkeypatch):
  shard = tmp_path / 'shards' / '00000.tar'
  shard.parent.mkdir()
  evil = {'/tmp/evil_abs.jpg', '../evil_up.jpg', 'a/../../evil_deep.txt', '..\\evil_win.jpg'}
  with tarfile.open(shard, 'w') as tar:
    for name, data in [('ok.jpg', jpeg(0)), ('ok.txt', b'a caption'), *((n, jpeg(1)) for n in sorted(evil))]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  run_dir = tmp_path / 'cwd'
  run_dir.mkdir()
  monkeypatch.chdir(run_dir)  # where a relative member would land if anything extracted it
  before = {str(p) for p in tmp_path.rglob('*')}
  recs = list(webdataset.read_shard(str(shard)))
  good = [r for r in recs if not records.is_skipped(r)]
  assert [(r['key'], r['caption']) for r in good] == [('ok', 'a caption')]
  skips = sorted((r['key'], r[records.SKIP]) for r in recs if records.is_skipped(r))
  assert skips == sorted((f'00000.tar:{n}', 'unsafe_member') for n in evil)
  assert {str(p) for p in tmp_path.rglob('*')} == before  # nothing written anywhere under the test dir
  assert not os.path.exists('/tmp/evil_abs.jpg')


def test_a_workdir_config_is_json_and_never_executed(tmp_path):
  marker = tmp_path / 'executed'
  (tmp_path / 'config.json').write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
  with pytest.raises(ValueError):  # json.JSONDecodeError: not JSON, not run
    identity.load_config(str(tmp_path))
  assert not marker.exists()
  assert paths.exists(str(tmp_path / 'config.json'))

