"""Reading what the TPU compiler produced: the collectives of a program's optimized HLO, and
the largest buffers of the buffer assignment XLA dumps (or of the state, without a dump)."""
import collections
import glob
import math
import os
import re

import jax
import numpy as np

from vlp.compile import target

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 's4': 0.5, 'u4': 0.5, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
             'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16}
_SHAPE = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]')
_DEF = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')  # name = type op(rest
_COLLECTIVE_OP = re.compile('^(' + '|'.join(COLLECTIVES) + r')(-start|-done)?$')
_OPERANDS = re.compile(r'%([\w.\-]+)')
_ARGS_END = re.compile(r'\)(?:, |$)')  # the operand list's end (a TPU layout's T(8,128) is not it)
_NO_TRAFFIC = ('parameter', 'tuple', 'get-tuple-element', 'bitcast', 'constant', 'while', 'call', 'conditional')
COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+) [(].*[)] -> .*\{\s*$')  # a computation's header line
_WHILE = re.compile(r' while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)(?:.*?"known_trip_count":\{"n":"(\d+)")?')
_BOUND = re.compile(r's32\[\][^ ]* constant\((\d+)\)')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)')


def shape_bytes(text: str) -> int:
  """Bytes of every array shape in an HLO type string (a shape or a tuple of them)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    if dtype.startswith('f8') or dtype.startswith('f4'):
      size = 1
    else:
      size = _ITEMSIZE.get(dtype)
    if size is None:
      continue
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return int(total)


class _Program:
  """An optimized HLO module's text, read once: each computation's instructions, the type of
  every value, the trip count of each while loop's body, and who calls whom."""

  def __init__(self, hlo: str):
    comp, loops, bounds = None, [], {}
    self.instrs, self.types, self.trips = collections.defaultdict(list), {}, {}
    self.parents, self.fused, self.roots = collections.defaultdict(set), set(), {}
    for line in hlo.splitlines():
      m = COMPUTATION.match(line)
      if m:
        comp = m.group(1)
        continue
      w = _WHILE.search(line)
      if w:
        loops.append(w.groups())
      b = _BOUND.search(line)
      if b and comp not in bounds:
        bounds[comp] = int(b.group(1))
      for callee in _CALLS.findall(line):
        self.parents[callee].add(comp)
      d = _DEF.match(line)
      if d:
        name, type_, op, rest = d.groups()
        self.types[name] = type_
        if line.lstrip().startswith('ROOT '):
          self.roots[comp] = name
        self.instrs[comp].append((name, type_, op, rest))
        if op == 'fusion':
          self.fused.update(_CALLS.findall(rest))
    for cond, body, known in loops:  # a scan: i < N in the condition, N trips (or XLA's known count)
      n = int(known) if known else bounds.get(cond)
      if n:
        self.trips[body] = n

  def multiplier(self, c, seen=()) -> int:
    """How often computation c runs per call of the program: the product of the trip counts
    of the loops it sits in."""
    if c in seen:
      return 1
    up = max((self.multiplier(p, seen + (c,)) for p in self.parents.get(c, ()) if p), default=1)
    return self.trips.get(c, 1) * up


def collectives(hlo: str) -> dict:
  """{op: {'count', 'bytes'}} over the optimized HLO of one device's program.

  bytes are the op's result per device (an all-gather's gathered array, a reduce-scatter's
  shard, an all-reduce's whole buffer); an async pair counts once, by its -done. An op in a
  while loop (a lax.scan: scanned layers, gradient accumulation, the chunked loss) counts once
  per trip, the trip count being XLA's known_trip_count or the s32 bound its condition
  compares with; anything else counts as often as it appears."""
  program = _Program(hlo)
  out = {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES}
  for comp, instrs in program.instrs.items():
    k = program.multiplier(comp)
    for _, type_, op, _ in instrs:
      m = _COLLECTIVE_OP.match(op)
      if m and m.group(2) != '-start':
        out[m.group(1)]['count'] += k
        out[m.group(1)]['bytes'] += k * shape_bytes(type_)
  return out


def loop_trips_cost(hlo: str) -> dict:
  """{'flops', 'bytes_accessed'} of the loop trips XLA's cost analysis leaves out: it counts a
  while loop's body once, so a scan over 24 layers would show one layer's cost. For every
  computation run k > 1 times (multiplier), k - 1 more of: its matmul FLOPs (2 x output x
  contracted size of each dot, fused ones included; a TPU program's matmuls are convolutions,
  left out: vlp.compile.programs floors the compute bound with the model's FLOPs), and for a
  loop body the bytes its instructions read and write (result and operands, as XLA counts a
  top-level instruction)."""
  program, flops, nbytes = _Program(hlo), 0.0, 0.0
  for comp, instrs in program.instrs.items():
    extra = program.multiplier(comp) - 1
    if extra <= 0:
      continue
    for _, type_, op, rest in instrs:
      if op == 'dot':
        flops += extra * _dot_flops(program, type_, rest)
      if comp in program.trips and comp not in program.fused and op not in _NO_TRAFFIC:
        nbytes += extra * _traffic(program, type_, op, rest)
  return {'flops': flops, 'bytes_accessed': nbytes}


def _args(rest) -> list[str]:
  return _OPERANDS.findall(_ARGS_END.split(rest, 1)[0])


def _traffic(program, type_, op, rest) -> int:
  """Bytes a top-level instruction reads and writes. A loop body slices its layer's params out
  of the stacked ones and writes its activations into stacked buffers in place: a dynamic
  slice reads its slice, an update in place writes its update (in a fusion too), not the
  whole stack."""
  args = _args(rest)
  size = lambda v: shape_bytes(program.types.get(v, ''))
  if op == 'dynamic-slice':
    return 2 * shape_bytes(type_)
  if op == 'dynamic-update-slice':
    return 2 * size(args[1])
  reads, out = {i: size(a) for i, a in enumerate(args)}, shape_bytes(type_)
  fused = _CALLS.findall(rest) if op == 'fusion' else []
  body = program.instrs.get(fused[0], []) if fused else []
  params = {n: int(r.split(')', 1)[0]) for n, _, o, r in body if o == 'parameter'}
  for n, t, o, r in body:
    inner = _args(r)
    if o in ('dynamic-slice', 'dynamic-update-slice') and inner and inner[0] in params:
      reads[params[inner[0]]] = shape_bytes(t) if o == 'dynamic-slice' else 0
      if o == 'dynamic-update-slice' and n == program.roots.get(fused[0]):
        out = shape_bytes(program.types.get(inner[1], ''))
  return out + sum(reads.values())


def _dot_flops(program, type_, rest) -> float:
  lhs = _args(rest)[:1]
  dims = _SHAPE.findall(program.types.get(lhs[0], '')) if lhs else []
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
  if not dims or not contracting:
    return 0.0
  lhs_dims = [int(d) for d in dims[0][1].split(',') if d]
  k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(',') if i)
  out = _SHAPE.findall(type_)
  return 2.0 * k * math.prod(int(d) for d in out[0][1].split(',') if d) if out else 0.0


def _latest_dump(module: str):
  d = os.environ.get(target.DUMP_ENV)
  if not d or not os.path.isdir(d):
    return None
  files = glob.glob(os.path.join(d, f'*{module}*after_optimizations-buffer-assignment.txt'))
  return max(files, key=os.path.getmtime) if files else None


_ALLOCATION = re.compile(r'allocation \d+: size \d+, (.*)')
_VALUE = re.compile(r'\s*value: <\d+ (\S+) @[^>]*> \(size=(\d+),offset=\d+\): (\S+?)(?:\{|$)')
_FROM = re.compile(r'from instruction: %([\w.\-]+) = (.*)')
_OP_NAME = re.compile(r'metadata=\{op_name="((?:[^"\\]|\\.)*)"')


def _values(text: str):
  """([(bytes, shape, value)], {value: 'argument' | 'output' | 'temp'}) of a buffer assignment."""
  kinds, values, alloc = {}, [], None
  for line in text.splitlines():
    a = _ALLOCATION.match(line)
    if a:
      alloc = 'argument' if 'parameter' in a.group(1) else 'output' if 'output' in a.group(1) else 'temp'
      continue
    v = _VALUE.match(line)
    if v:
      values.append((int(v.group(2)), v.group(3), v.group(1)))
      kinds.setdefault(v.group(1), alloc)
  return values, kinds


def _instructions(text: str):
  """({instruction: its op_name (the jax path of an argument, the op of a temp)}, {parameters})."""
  names, params = {}, set()
  for m in _FROM.finditer(text):
    op = _OP_NAME.search(m.group(2))
    if op:
      names[m.group(1)] = op.group(1).replace("\\'", "'").replace('\\"', '"')
    if re.search(r' parameter\(\d+\)', m.group(2)):
      params.add(m.group(1))
  return names, params


def dumped_buffers(module: str, n: int = 5):
  """The n largest values of the last buffer assignment XLA dumped for `module` (jit_NAME):
  [(bytes, shape, what)], what = the argument's path, or the op that made a temp; None
  without a dump."""
  path = _latest_dump(module)
  if not path:
    return None
  with open(path) as f:
    values, kinds = _values(f.read())
  vpath = path.replace('buffer-assignment.txt', 'buffer-assignment-values.txt')
  names, params = {}, set()
  if os.path.exists(vpath):
    with open(vpath) as f:
      names, params = _instructions(f.read())
  best, seen = [], set()
  for size, shape, name in sorted(values, key=lambda x: -x[0]):
    kind = kinds.get(name, 'temp')
    if name in seen or (kind == 'argument' and params and name not in params):
      continue  # an update written over its donated argument: the same memory
    seen.add(name)
    best.append((size, shape, f'{kind} {names.get(name, name)}'))
    if len(best) == n:
      break
  return best


def largest_leaves(tree, n: int = 5, name: str = 'state'):
  """[(bytes per device, shape, name + path)] of the largest leaves of a tree of sharded
  ShapeDtypeStructs."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shard = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape
    out.append((int(math.prod(shard) * np.dtype(x.dtype).itemsize), f'{np.dtype(x.dtype).name}{list(shard)}',
                name + jax.tree_util.keystr(path)))
  return sorted(out, key=lambda t: -t[0])[:n]
