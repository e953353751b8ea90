"""A torch.save'd state dict (`pytorch_model.bin`, `open_clip_pytorch_model.bin`, `.pt`) as
{name: numpy array}, without torch and without running anything the file names
(`vlp import --allow-pickle`).

torch.save writes a zip: `<name>/data.pkl`, a pickle of the dict in which each tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and each
storage a persistent id ('storage', torch.<Type>Storage, key, location, numel) whose bytes are
the member `<name>/data/<key>`; `<name>/byteorder` says their byte order. Those, with
`collections.OrderedDict` (the dict and its empty hooks), are all the globals such a pickle names
(checked with pickletools on torch 2.x), so find_class gives exactly those, as numpy stand-ins, and
refuses any other in one line: a pickle that names os.system, eval or any class builds nothing.
"""
import collections
import io
import pickle
import sys
import zipfile

import numpy as np

from vlp.core import paths

# torch's storage types -> the numpy dtype of their bytes; bfloat16 is read as its 16 bits and
# widened to float32 exactly (the bits shifted to the top half), as torch's `.float()` does
_DTYPES = {'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
           'BFloat16Storage': np.uint16, 'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
           'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}
ALLOWED = 'collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch.<Type>Storage'
_StorageType = collections.namedtuple('_StorageType', 'name')  # find_class's torch.<Type>Storage: not callable
_Storage = collections.namedtuple('_Storage', 'array bf16')  # persistent_load's: the bytes as a flat array


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  """torch's tensor constructor, in numpy: a copy of the strided view of the storage."""
  if not isinstance(storage, _Storage):
    raise ValueError(f'a tensor of {type(storage).__name__}, not of a storage')
  if metadata:  # a lazily conjugated or negated tensor: its values are not its bytes
    raise ValueError(f'a tensor with metadata {metadata!r}')
  size, stride, a = tuple(size), tuple(stride), storage.array
  if not all(type(x) is int for x in (offset, *size, *stride)) or len(size) != len(stride) or offset < 0 or \
      min((*size, *stride), default=0) < 0:
    raise ValueError(f'a tensor of size {size}, stride {stride}, offset {offset!r}')
  if 0 in size:
    out = np.zeros(size, a.dtype)
  else:  # every element must lie inside the storage: as_strided reads wherever it is told
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= a.size:
      raise ValueError(f'a tensor of size {size}, stride {stride}, offset {offset} past its storage of {a.size}')
    out = np.lib.stride_tricks.as_strided(a[offset:], size, [s * a.itemsize for s in stride], writeable=False)
  out = np.array(out, a.dtype.newbyteorder('='), order='C')  # a C-contiguous copy in the machine's byte order
  return (out.astype(np.uint32) << 16).view(np.float32) if storage.bf16 else out


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds dicts and tensors; every other global is refused before anything is called."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, order: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix, self.order, self.storages = archive, prefix, order, {}

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor_v2
    if module == 'torch' and name in _DTYPES:
      return _StorageType(name)
    raise ValueError(f'refused to unpickle {module}.{name}: a state dict of tensors names only {ALLOWED}')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and type(pid[4]) is int):
      raise ValueError(f'a persistent id {pid!r:.80} that is not a storage')
    _, kind, key, _, numel = pid
    if key not in self.storages:  # storages shared by several tensors (views, tied weights) are read once
      dtype = np.dtype(_DTYPES[kind.name]).newbyteorder(self.order)
      data = self.archive.read(f'{self.prefix}data/{key}')
      if len(data) != numel * dtype.itemsize:
        raise ValueError(f'storage {key}: {len(data)} bytes for {numel} {kind.name} elements')
      self.storages[key] = _Storage(np.frombuffer(data, dtype), kind.name == 'BFloat16Storage')
    return self.storages[key]


def _tensors(obj, path: str) -> dict:
  """The state dict: the top level, or under 'state_dict' / 'model' (training checkpoints)."""
  for d in (obj, *(obj.get(k) for k in ('state_dict', 'model') if isinstance(obj, dict))):
    if isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in d.items()):
      return dict(d)
  raise ValueError(f'torch pickle {path}: not a dict of tensors (nor one under "state_dict" or "model")')


def read(path: str) -> dict:
  """{name: numpy array} of a torch.save'd state dict (zip format, torch >= 1.6)."""
  with paths.local_copy_if_remote(path) as local:
    if not zipfile.is_zipfile(local):  # the legacy format: several pickles; not read
      raise ValueError(f'torch pickle {path}: not a torch.save zip archive (torch >= 1.6); it is not read')
    with zipfile.ZipFile(local) as archive:
      names = archive.namelist()
      pickles = [n for n in names if n.count('/') == 1 and n.endswith('/data.pkl')]
      if len(pickles) != 1:
        raise ValueError(f'torch pickle {path}: {len(pickles)} <name>/data.pkl members, not one')
      prefix = pickles[0][:-len('data.pkl')]
      order = archive.read(prefix + 'byteorder').decode() if prefix + 'byteorder' in names else 'little'
      if order not in ('little', 'big'):
        raise ValueError(f'torch pickle {path}: byteorder {order!r:.20}')
      try:
        obj = _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, '<' if order == 'little' else '>').load()
      except Exception as e:  # noqa: BLE001 - whatever the bytes make the unpickler do: one line
        raise ValueError(f'torch pickle {path}: {paths.first_line(e)}') from e
  return _tensors(obj, path)


def read_allowed(path: str, allow_pickle: bool, convert_to: str) -> dict:
  """`vlp import` of a torch pickle: without --allow-pickle, one line saying how to convert it;
  with it, one warning line on stderr, then read(path)."""
  if not allow_pickle:
    raise ValueError(f'vlp import: {path} is a torch pickle, which vlp does not load (unpickling runs code): '
                     f'convert it to {convert_to} with safetensors.torch.save_file, or pass --allow-pickle to '
                     'read its tensors with a restricted unpickler')
  print(f'vlp import: reading the torch pickle {path} with a restricted unpickler (--allow-pickle): only '
        'tensors and dicts are rebuilt, anything else is refused', file=sys.stderr)
  return read(path)
