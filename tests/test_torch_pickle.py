"""`vlp import --allow-pickle`: a torch.save'd state dict read without torch by a restricted
unpickler (vlp/interop/torch_pickle.py). What torch wrote (every dtype, views, strides, shared
storages) comes back bit for bit against safetensors of the same tensors; a pickle that names
anything but dicts, tensors and storages is refused in one line and runs nothing; without the
flag a torch pickle is refused in one line naming it; with it, an import equals the import of the
same model's safetensors."""
import json
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import safetensors.numpy
from conftest import transformers_python

from vlp import cli, pretrained
from vlp.bench import compare
from vlp.interop import torch_pickle

# torch writes these (run in the open_clip environment): every storage type, a transposed tensor,
# views at offsets of one shared storage, a stride-0 expand, a tied weight, a scalar, an empty
# tensor; the same dict nested as training checkpoints nest it; safetensors of the same values
# (bf16 as torch's .float()) as the reference
SAVE = '''
import sys, torch, safetensors.torch
out = sys.argv[1]
torch.manual_seed(0)
base, w = torch.randn(40), torch.randn(3, 5)
sd = {'f32': torch.randn(4, 6), 'f16': torch.randn(7).half(), 'bf16': torch.randn(2, 3).bfloat16(),
      'f64': torch.randn(3).double(), 'i64': torch.arange(-5, 5), 'i32': torch.arange(6, dtype=torch.int32) - 3,
      'i16': torch.arange(4, dtype=torch.int16), 'i8': torch.arange(-3, 3, dtype=torch.int8),
      'u8': torch.arange(250, 256, dtype=torch.uint8), 'bool': torch.randn(5) > 0,
      'transposed': w.t(), 'tied': w, 'view': base[7:19].view(3, 4), 'strided': base[1::3],
      'bf16_view': torch.randn(6, 4).bfloat16()[1:, 2], 'expanded': torch.randn(3, 1).expand(3, 4),
      'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 3)}
torch.save(sd, f'{out}/plain.pt')
torch.save({'state_dict': sd, 'epoch': 3}, f'{out}/nested.pt')
torch.save({'model': sd, 'optimizer': {'lr': 0.1}}, f'{out}/model.pt')
ref = {k: (v.float() if v.dtype == torch.bfloat16 else v).contiguous().clone() for k, v in sd.items()}
safetensors.torch.save_file(ref, f'{out}/ref.safetensors')
'''


def _bench(*args):
  """Runs python with args in the open_clip environment (skips where there is none)."""
  try:
    python = compare.bench_python(None)
  except compare.ReferenceEnvError as e:
    pytest.skip(str(e))
  proc = subprocess.run([python, *map(str, args)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_what_torch_saved_reads_back_bit_for_bit(tmp_path):
  _bench('-c', SAVE, tmp_path)
  want = safetensors.numpy.load_file(str(tmp_path / 'ref.safetensors'))
  for name in ('plain.pt', 'nested.pt', 'model.pt'):
    got = torch_pickle.read(str(tmp_path / name))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
      assert (got[k].dtype, got[k].shape, got[k].tobytes()) == (v.dtype, v.shape, v.tobytes()), (name, k)
      assert got[k].flags.c_contiguous and got[k].flags.writeable  # copies, not views of the file's bytes


def _archive(path, data_pkl: bytes, storages=None, order=b'little'):
  """A zip laid out as torch.save lays one out."""
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', data_pkl)
    z.writestr('archive/byteorder', order)
    for key, data in (storages or {}).items():
      z.writestr(f'archive/data/{key}', data)
  return str(path)


class _Reduce:
  """Unpickles as fn(*args): the way a crafted pickle runs code."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize('payload', ['system', 'eval', 'load_from_bytes', 'rebuild_parameter'])
def test_a_pickle_naming_anything_else_is_refused_in_one_line_and_runs_nothing(tmp_path, payload):
  marker = tmp_path / 'ran'
  pkl, name = {
      'system': (lambda: pickle.dumps({'w': _Reduce(os.system, f'touch {marker}')}, protocol=2),
                 f'{os.system.__module__}.system'),
      'eval': (lambda: pickle.dumps(_Reduce(eval, f'__import__("pathlib").Path({str(marker)!r}).touch()')),
               'builtins.eval'),
      # globals torch itself may name in other pickles, not in a state dict of tensors
      'load_from_bytes': (lambda: b'\x80\x02ctorch.storage\n_load_from_bytes\nC\x01x\x85R.',
                          'torch.storage._load_from_bytes'),
      'rebuild_parameter': (lambda: b'\x80\x02ctorch._utils\n_rebuild_parameter\n.', 'torch._utils._rebuild_parameter'),
  }[payload]
  path = _archive(tmp_path / 'pytorch_model.bin', pkl())
  with pytest.raises(ValueError) as e:
    torch_pickle.read(path)
  assert f'refused to unpickle {name}:' in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
  assert not marker.exists()


def test_a_bare_pickle_is_not_unpickled(tmp_path):
  marker = tmp_path / 'ran'
  (tmp_path / 'model.pt').write_bytes(pickle.dumps(_Reduce(os.system, f'touch {marker}')))
  with pytest.raises(ValueError, match='not a torch.save zip archive'):
    torch_pickle.read(str(tmp_path / 'model.pt'))
  assert not marker.exists()


def _tensor(size, stride, offset=0, numel=6, extra=b''):
  """The pickle ops torch writes for one float tensor of storage '0' (protocol 0 spellings)."""
  ints = lambda xs: b'(' + b''.join(b'I%d\n' % x for x in xs) + b't'
  return (b'ctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI%d\ntQI%d\n'
          % (numel, offset) + ints(size) + ints(stride) + b'I00\n}' + extra + b'tR')


@pytest.mark.parametrize('order', ['<', '>'])
def test_strides_offsets_and_byte_order_are_read_as_torch_reads_them(tmp_path, order):
  storage = {'0': np.arange(6, dtype=f'{order}f4').tobytes()}
  pkl = b'(Vw\n' + _tensor((2, 2), (1, 3), offset=1) + b'd.'
  got = torch_pickle.read(_archive(tmp_path / 'a.pt', pkl, storage, b'little' if order == '<' else b'big'))
  np.testing.assert_array_equal(got['w'], [[1, 4], [2, 5]])
  assert got['w'].dtype == np.float32 and got['w'].dtype.isnative


@pytest.mark.parametrize('tensor,why', [
    (_tensor((2, 2), (1, 3), offset=2), 'past its storage of 6'),
    (_tensor((7,), (1,)), 'past its storage of 6'),
    (_tensor((2,), (-1,), offset=3), 'a tensor of size (2,), stride (-1,)'),
    (_tensor((6,), (1,), numel=5), 'storage 0: 24 bytes for 5 FloatStorage elements'),
    (_tensor((6,), (1,), extra=b'(dVneg\nI01\ns'), "metadata {'neg': True}"),
    (b'ctorch\nFloatStorage\n)R', "'_StorageType' object is not callable"),
])
def test_a_malformed_tensor_is_refused_in_one_line(tmp_path, tensor, why):
  path = _archive(tmp_path / 'a.pt', b'(Vw\n' + tensor + b'd.', {'0': np.zeros(6, np.float32).tobytes()})
  with pytest.raises(ValueError) as e:
    torch_pickle.read(path)
  assert why in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


VOCAB, CONTEXT = 1000, 16
OPEN_CLIP = {'embed_dim': 32, 'quick_gelu': True,
             'vision_cfg': {'image_size': 16, 'patch_size': 4, 'width': 64, 'head_width': 32, 'layers': 2},
             'text_cfg': {'context_length': CONTEXT, 'vocab_size': VOCAB, 'width': 48, 'heads': 2, 'layers': 2}}
CLIP = {'architectures': ['CLIPModel'], 'projection_dim': 32,
        'text_config': {'vocab_size': VOCAB, 'hidden_size': 48, 'intermediate_size': 192, 'num_hidden_layers': 2,
                        'num_attention_heads': 2, 'max_position_embeddings': CONTEXT, 'eos_token_id': VOCAB - 1,
                        'bos_token_id': VOCAB - 2, 'pad_token_id': 0},
        'vision_config': {'hidden_size': 64, 'intermediate_size': 256, 'num_hidden_layers': 2,
                          'num_attention_heads': 2, 'image_size': 16, 'patch_size': 4}}
SOURCES = {'open_clip': ('open_clip_config.json', {'model_cfg': OPEN_CLIP}, 'open_clip_pytorch_model.bin'),
           'hf': ('config.json', CLIP, 'pytorch_model.bin')}


@pytest.mark.parametrize('fmt', sorted(SOURCES))
def test_a_torch_pickle_is_refused_without_allow_pickle_and_warned_of_with_it(tmp_path, capsys, fmt):
  config, cfg, weights = SOURCES[fmt]
  src = tmp_path / 'src'
  src.mkdir()
  (src / config).write_text(json.dumps(cfg))
  (src / weights).write_bytes(b'not a zip: never read without the flag')
  assert cli.main(['import', str(src), f'--out={tmp_path / "o"}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f'{weights} is a torch pickle, which vlp does not load' in err[0], err
  assert 'pass --allow-pickle' in err[0]
  assert cli.main(['import', str(src), f'--out={tmp_path / "o"}', '--allow-pickle']) == 2
  warning, error = capsys.readouterr().err.strip().splitlines()
  assert warning.startswith(f'vlp import: reading the torch pickle {src / weights} with a restricted unpickler')
  assert 'not a torch.save zip archive' in error
  assert not (tmp_path / 'o').exists()


# the same random model twice: its safetensors as transformers / open_clip publish it, and the
# torch pickle of its state dict
BUILD = '''
import json, sys, numpy as np, torch, transformers
fmt, safe, pickled = sys.argv[1:]
if fmt == 'hf':
  with open(f'{pickled}/config.json') as f:
    cfg = transformers.CLIPConfig(**json.load(f))
  torch.manual_seed(0)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(safe)
  torch.save(model.state_dict(), f'{pickled}/pytorch_model.bin')
else:
  sd = {k: torch.from_numpy(v) for k, v in np.load(f'{safe}/state_dict.npz').items()}
  torch.save(sd, f'{pickled}/open_clip_pytorch_model.bin')
'''


def _sources(tmp_path, fmt):
  safe, pickled = tmp_path / 'safe', tmp_path / 'pickled'
  pickled.mkdir()
  if fmt == 'hf':
    transformers_python()  # skips where the open_clip environment lacks transformers
    (pickled / 'config.json').write_text(json.dumps(CLIP))
  else:
    (tmp_path / 'cfg.json').write_text(json.dumps(OPEN_CLIP))
    np.savez(tmp_path / 'in.npz', image_nchw=np.zeros((1, 3, 16, 16), np.float32), tokens=np.zeros((1, CONTEXT), int))
    _bench(os.path.join(os.path.dirname(__file__), 'open_clip_model_ref.py'), '--config', tmp_path / 'cfg.json',
           '--inputs', tmp_path / 'in.npz', '--out', safe)
    (pickled / 'open_clip_config.json').write_bytes((safe / 'open_clip_config.json').read_bytes())
  _bench('-c', BUILD, fmt, safe, pickled)
  if fmt == 'open_clip':  # as the hub ships it
    safetensors.numpy.save_file(dict(np.load(safe / 'state_dict.npz')), str(safe / 'open_clip_model.safetensors'))
  return safe, pickled


@pytest.mark.slow
@pytest.mark.parametrize('fmt', sorted(SOURCES))
def test_an_import_with_allow_pickle_equals_the_import_of_the_safetensors(tmp_path, capsys, fmt):
  safe, pickled = _sources(tmp_path, fmt)
  assert cli.main(['import', str(pickled), f'--out={tmp_path / "x"}']) == 2
  assert '--allow-pickle' in capsys.readouterr().err
  assert cli.main(['import', str(pickled), f'--out={tmp_path / "from_pickle"}', '--allow-pickle']) == 0
  err = capsys.readouterr().err
  assert err.count('restricted unpickler (--allow-pickle)') == 1, err
  assert cli.main(['import', str(safe), f'--out={tmp_path / "from_safetensors"}']) == 0
  assert 'unpickler' not in capsys.readouterr().err
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  tokens = np.zeros((3, CONTEXT), np.int32)
  for i, n in enumerate((3, 7, 14)):
    tokens[i, 0], tokens[i, 1:n + 1], tokens[i, n + 1] = VOCAB - 2, rng.integers(1, VOCAB - 2, n), VOCAB - 1
  a, b = pretrained.load(str(tmp_path / 'from_pickle')), pretrained.load(str(tmp_path / 'from_safetensors'))
  diffs = (np.abs(a.encode_image(images) - b.encode_image(images)).max(),
           np.abs(a.encode_text(tokens) - b.encode_text(tokens)).max())
  print(f'{fmt} --allow-pickle against safetensors: image {diffs[0]:.2e}, text {diffs[1]:.2e}')
  assert max(diffs) <= 1e-6, diffs
