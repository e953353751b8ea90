"""Reading what the TPU compiler produced: a program's optimized HLO (its while loops' trip
counts, its logical collectives and the bytes they send over the links, the bytes of the loop
trips XLA's cost analysis leaves out), and the largest buffers of the buffer assignment XLA
dumps (or of the state, without a dump)."""
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
_SHAPE = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](?:\{([^}]*)\})?')  # dtype[dims]{layout}
_TILE = re.compile(r'([\d,]*):T\(([\d,]+)\)')  # {minor-to-major dims:T(tile)...}
_DEF = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')  # name = type op(rest
_COLLECTIVE_OP = re.compile('^(' + '|'.join(COLLECTIVES) + r')(-start|-update|-done)?$')
_OPERANDS = re.compile(r'%([\w.\-]+)')
_ARGS_END = re.compile(r'\)(?:, |$)')  # the operand list's end (a TPU layout's T(8,128) is not it)
_NO_TRAFFIC = ('parameter', 'tuple', 'get-tuple-element', 'bitcast', 'constant', 'while', 'call', 'conditional')
_ASYNC_MOVES = ('copy-start', 'copy-done', 'slice-start', 'slice-done')  # their done's type: what they move
COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+) [(].*[)] -> .*\{\s*$')  # a computation's header line
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)')
_FUSED = re.compile(r'\bcalls=%?([\w.\-]+)')  # a fusion's computation, or an async op's wrapped one
_WHILE = re.compile(r'condition=%?([\w.\-]+), body=%?([\w.\-]+)')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_INDEX = re.compile(r'\bindex=(\d+)')
_DIRECTION = re.compile(r'\bdirection=([A-Z]+)')
_CHANNEL = re.compile(r'\bchannel_id=(\d+)')
# device groups: {{0,1},...}, {}, iota [groups,size]<=..., or named mesh axes, the mesh's devices in
# another order (device_ids=([4,64]T(1,0)) on a data x fsdp mesh) or not: the group size is the same
_GROUPS = re.compile(r"replica_groups=(\{\{[\d,]*\}|\{\}|\[\d+,\d+\]<=|mesh\[[^\]]*\](?:, device_ids=[^ ]*)? \{[^}]*\})")
_MESH_AXIS = re.compile(r"'(\w+)'=(\d+)")
_TARGET = re.compile(r'custom_call_target="(\w+)"')
# XLA's TPU reduce-scatter: a fusion of the whole all-reduce and the dynamic-slice of this device's part
REDUCE_SCATTER_FUSION = 'all-reduce-scatter'
# the roots of the TPU compiler's fusions that start and end an async collective
ASYNC_COLLECTIVE = {'AsyncCollectiveStart': 'start', 'AsyncCollectiveDone': 'done'}


def shape_bytes(text: str, tiled: bool = False) -> int:
  """Bytes of every array shape in an HLO type string (a shape or a tuple of them); tiled: as
  laid out in memory, each dimension a layout tile covers padded to the tile (a TPU's
  f32[4,32]{1,0:T(4,128)} holds 4 x 128 floats), as XLA's TPU cost analysis counts them."""
  total = 0
  for dtype, dims, layout in _SHAPE.findall(text):
    if dtype.startswith('f8') or dtype.startswith('f4'):
      size = 1
    else:
      size = _ITEMSIZE.get(dtype)
    if size is None:
      continue
    shape = [int(d) for d in dims.split(',') if d]
    tile = _TILE.match(layout) if tiled else None
    if tile:  # the layout's dimensions minor first; the tile's last size is the minor one's
      minor_first = [int(d) for d in tile.group(1).split(',') if d]
      for d, t in zip(minor_first, reversed([int(t) for t in tile.group(2).split(',')])):
        shape[d] = -(-shape[d] // t) * t
    total += size * math.prod(shape)
  return int(total)


class Instr(collections.namedtuple('Instr', 'name type op rest')):
  """One HLO instruction: `name = type op(rest`, rest being its operands and attributes."""

  @property
  def args(self) -> list[str]:
    return _OPERANDS.findall(_ARGS_END.split(self.rest, 1)[0])


class Program:
  """An optimized HLO module's text, read once: each computation's instructions, every value's
  definition (names are unique in a module), who calls whom, the devices the module spans
  (partitions x replicas: what replica_groups={} means) and every while loop with its trip
  count (loop_trips)."""

  def __init__(self, hlo: str):
    comp, whiles = None, []
    self.instrs, self.defs, self.roots = collections.defaultdict(list), {}, {}
    self.parents, self.fused = collections.defaultdict(set), set()
    header = hlo.split('\n', 1)[0]
    self.devices = math.prod(int(n) for n in re.findall(r'\b(?:num_partitions|replica_count)=(\d+)', header))
    for line in hlo.splitlines():
      m = COMPUTATION.match(line)
      if m:
        comp = m.group(1)
        continue
      for callee in _CALLS.findall(line):
        self.parents[callee].add(comp)
      d = _DEF.match(line)
      if not d:
        continue
      ins = Instr(*d.groups())
      self.defs[ins.name] = ins
      self.instrs[comp].append(ins)
      if line.lstrip().startswith('ROOT '):
        self.roots[comp] = ins.name
      self.fused.update(_FUSED.findall(ins.rest))
      if ins.op == 'while':
        whiles.append(ins)
    self.loops = [loop_trips(self, loop) for loop in whiles]
    self.trips = {loop['body']: loop['trips'] for loop in self.loops}

  def multiplier(self, c, seen=()) -> int:
    """How often computation c runs per call of the program: the product of the trip counts
    of the loops it sits in."""
    if c in seen:
      return 1
    up = max((self.multiplier(p, seen + (c,)) for p in self.parents.get(c, ()) if p), default=1)
    return self.trips.get(c, 1) * up


def _program(hlo) -> Program:
  return hlo if isinstance(hlo, Program) else Program(hlo)


def _type(program, name) -> str:
  ins = program.defs.get(name)
  return ins.type if ins else ''


# --- loop trip counts ------------------------------------------------------------------------------
def loop_trips(program: Program, loop: Instr) -> dict:
  """{'while', 'body', 'trips', 'read'} of a while loop: read from its induction variable (a
  state element that starts at a constant, steps by a constant each trip and is compared with
  a constant: s32 or u32, any step, either direction), else XLA's known_trip_count, else 1
  ('read': 'unread', the body counted once)."""
  cond, body = _WHILE.search(loop.rest).groups()
  trips, read = _induction_trips(program, loop, cond, body), 'induction variable'
  if trips is None:
    known = _KNOWN_TRIPS.search(loop.rest)
    trips, read = (int(known.group(1)), 'known_trip_count') if known else (1, 'unread')
  return {'while': loop.name, 'body': body, 'trips': trips, 'read': read}


def _induction_trips(program, loop, cond, body) -> int | None:
  """Trips of the loop from its condition (state element i + k compared with a constant), the
  body's root (element i stepped by a constant) and the loop's initial state (element i a
  constant); None where any of these is something else."""
  compare = _compare(program, program.roots.get(cond), [('state',)])
  if not compare:
    return None
  direction, lhs, rhs = compare
  if rhs and rhs[0] == 'iv':  # bound OP x: x OP' bound
    direction, lhs, rhs = {'LT': 'GT', 'LE': 'GE', 'GT': 'LT', 'GE': 'LE'}.get(direction, direction), rhs, lhs
  if not lhs or lhs[0] != 'iv' or not rhs or rhs[0] != 'c':
    return None
  i, bound = lhs[1], rhs[1] - lhs[2]
  root, init = program.defs.get(program.roots.get(body)), program.defs.get((loop.args or [''])[0])
  if not root or root.op != 'tuple' or not init or init.op != 'tuple' or i >= min(len(root.args), len(init.args)):
    return None
  step, start = _scalar(program, root.args[i], [('state',)]), _scalar(program, init.args[i], [])
  if not step or step[:2] != ('iv', i) or not start or start[0] != 'c':
    return None
  return _count(start[1], bound, step[2], direction)


def _count(start: int, bound: int, step: int, direction: str) -> int | None:
  """Trips of `for (x = start; x DIRECTION bound; x += step)`; None for a loop without an end."""
  if step > 0 and direction in ('LT', 'LE', 'NE'):
    span = bound - start + (1 if direction == 'LE' else 0)
  elif step < 0 and direction in ('GT', 'GE', 'NE'):
    span, step = start - bound + (1 if direction == 'GE' else 0), -step
  else:
    return None
  if direction == 'NE' and span % step:
    return None
  return max(0, -(-span // step))


def _compare(program, name, args):
  """(direction, lhs, rhs) of the comparison computing `name` (in a fusion too), operands as
  _scalar reads them; None if it is none."""
  ins = program.defs.get(name)
  if ins is None:
    return None
  if ins.op == 'fusion':
    callee = _FUSED.search(ins.rest).group(1)
    return _compare(program, program.roots.get(callee), [_scalar(program, a, args) for a in ins.args])
  if ins.op != 'compare' or len(ins.args) != 2:
    return None
  return (_DIRECTION.search(ins.rest).group(1), *(_scalar(program, a, args) for a in ins.args))


def _scalar(program, name, args):
  """What an integer scalar is: ('c', value) a constant, ('iv', i, k) element i of the loop
  state plus k, ('state',) the loop state; None if it is none of these. args: what the
  computation's parameters are (a loop's condition and body: the state)."""
  ins = program.defs.get(name)
  if ins is None:
    return None
  ops = [_scalar(program, a, args) for a in ins.args] if ins.op in ('add', 'subtract', 'fusion') else []
  if ins.op == 'constant':
    value = re.match(r'(-?\d+)\)', ins.rest)
    return ('c', int(value.group(1))) if value and re.match(r'[su]\d+\[\]', ins.type) else None
  if ins.op == 'parameter':
    n = int(ins.rest.split(')', 1)[0])
    return args[n] if n < len(args) else None
  if ins.op == 'get-tuple-element' and ins.args and _scalar(program, ins.args[0], args) == ('state',):
    return ('iv', int(_INDEX.search(ins.rest).group(1)), 0)
  if ins.op in ('copy', 'bitcast', 'convert') and ins.args:
    return _scalar(program, ins.args[0], args)
  if ins.op == 'fusion':
    return _scalar(program, program.roots.get(_FUSED.search(ins.rest).group(1)), ops)
  if ins.op in ('add', 'subtract') and len(ops) == 2 and all(ops):
    (a, b), sign = ops, 1 if ins.op == 'add' else -1
    if a[0] == 'c' and b[0] == 'c':
      return ('c', a[1] + sign * b[1])
    if a[0] == 'iv' and b[0] == 'c':
      return ('iv', a[1], a[2] + sign * b[1])
    if a[0] == 'c' and b[0] == 'iv' and sign == 1:
      return ('iv', b[1], b[2] + a[1])
  return None


# --- collectives ---------------------------------------------------------------------------------
def collectives(hlo) -> dict:
  """{op: {'count', 'bytes', 'link_bytes'}} per device per step over a program's optimized HLO
  (its text or its Program): each logical collective counted once per run.

  An async collective is several instructions: a start, the continuation fusions the TPU
  compiler interleaves with compute, a done, each holding the collective op; they are one
  collective (logical_collectives). bytes: the op's result per device (an all-gather's gathered
  array, a reduce-scatter's shard, an all-reduce's whole buffer); link_bytes: what each device
  sends over its links, by a ring over the op's group of n devices ((n-1)/n of the gathered,
  or pre-scatter, array for an all-gather or a reduce-scatter, 2(n-1)/n of the buffer for an
  all-reduce, (n-1)/n for an all-to-all, the buffer for a collective-permute). An op in a
  while loop counts once per trip (Program.loops: the loops whose trips were not read count
  once)."""
  out = {op: {'count': 0, 'bytes': 0, 'link_bytes': 0.0} for op in COLLECTIVES}
  for c in logical_collectives(hlo):
    o = out[c['op']]
    o['count'] += c['runs']
    o['bytes'] += c['runs'] * c['bytes']
    o['link_bytes'] += c['runs'] * c['link_bytes']
  return out


def logical_collectives(hlo) -> list[dict]:
  """[{'op', 'name', 'bytes', 'arrays', 'group', 'link_bytes', 'runs'}]: each logical collective
  of the program (collectives), where `name` is its first instruction, `arrays` how many arrays
  it moves (more than one: XLA combined several), `group` its group size and `runs` how often
  it runs a step."""
  program, out = _program(hlo), []
  for comp, instrs in program.instrs.items():
    if comp in program.fused:
      continue  # a fusion's collectives are its caller's instruction's
    runs = program.multiplier(comp)
    for chain in _chains(program, instrs):
      out.append(dict(_describe(program, chain), runs=runs))
  return out


def _pieces(program, ins) -> list:
  """The collective ops an instruction is, or holds in the computations it calls (fusions, an
  async op's wrapped computation), nested ones too."""
  if _COLLECTIVE_OP.match(ins.op):
    return [ins]
  return [p for callee in _FUSED.findall(ins.rest) for inner in program.instrs.get(callee, ())
          for p in _pieces(program, inner)]


def _key(piece) -> tuple:
  """What the pieces of one async collective share: the op, its channel, shapes and group."""
  channel, groups = _CHANNEL.search(piece.rest), _GROUPS.search(piece.rest)
  shapes = tuple(s[:2] for s in _SHAPE.findall(piece.type))
  return _COLLECTIVE_OP.match(piece.op).group(1), channel and channel.group(1), shapes, groups and groups.group(1)


def _role(program, ins, pieces) -> str:
  """How an instruction holding collective pieces takes part in its collective: 'start',
  'continues' (a TPU continuation fusion: compute interleaved with the collective, whose
  buffers it passes on), 'done', or 'sync' (the whole collective)."""
  if ins.op.endswith('-start'):
    return 'start'
  if ins.op.endswith(('-done', '-update')):
    return 'done'
  if ins.op != 'fusion' or not pieces:
    return 'sync'
  root = program.defs.get(program.roots.get(_FUSED.search(ins.rest).group(1)))
  target = _TARGET.search(root.rest) if root is not None and root.op == 'custom-call' else None
  if target and target.group(1) in ASYNC_COLLECTIVE:
    return ASYNC_COLLECTIVE[target.group(1)]
  passed_on = root is not None and root.op == 'tuple' and any(p.name in root.args for p in pieces)
  return 'continues' if passed_on else 'sync'


def _chains(program, instrs) -> list[list]:
  """The computation's collectives as chains of (instruction, its pieces), one chain per
  logical collective, headed by its start or its synchronous op. A continuation or done
  joins the chain of the value it reads (directly or through get-tuple-element) that holds
  the same collective; one whose start it reads through something else (a loop the
  collective overlaps, a copy to another memory) joins the chain of a start holding it."""
  chains, chain_of, orphans = [], {}, []
  for ins in instrs:
    if ins.op == 'get-tuple-element' and ins.args and ins.args[0] in chain_of:
      chain_of[ins.name] = chain_of[ins.args[0]]  # a buffer of the collective, for its next piece
      continue
    pieces = _pieces(program, ins)
    role = _role(program, ins, pieces)
    if role in ('start', 'sync'):
      if pieces:
        chains.append([(ins, pieces)])
        chain_of[ins.name] = len(chains) - 1
      continue
    keys = {_key(p) for p in pieces}
    prior = next((chain_of[a] for a in ins.args if a in chain_of and (
        ins.op != 'fusion' or keys & {_key(p) for p in chains[chain_of[a]][0][1]})), None)
    if prior is not None:
      chains[prior].append((ins, pieces))
      chain_of[ins.name] = prior
    elif pieces:
      orphans.append((ins, pieces, keys))
  for ins, pieces, keys in orphans:
    start = next((c for c in chains if keys & {_key(p) for p in c[0][1]}), None)
    if start is None:
      chains.append([(ins, pieces)])  # its start is elsewhere: counted here
    else:
      start.append((ins, pieces))
  return chains


def _describe(program, chain) -> dict:
  """A chain's op, result bytes per device, the arrays it moves (several: a combined op),
  group size and link bytes (collectives)."""
  (head, pieces), (tail, tail_pieces) = chain[0], chain[-1]
  piece = pieces[0]
  op, n = _COLLECTIVE_OP.match(piece.op).group(1), _group_size(piece.rest, program.devices)
  # the result: the last piece's own type, or the op's that a fusion (a TPU async piece) holds
  result = (tail_pieces[0] if tail_pieces and tail is not tail_pieces[0] else tail).type
  full = shape_bytes(result)
  if head.op == 'fusion' and _FUSED.search(head.rest).group(1).startswith(REDUCE_SCATTER_FUSION):
    op, result, full = 'reduce-scatter', head.type, shape_bytes(piece.type)
  elif op == 'reduce-scatter':
    full = n * shape_bytes(result)
  return {'op': op, 'name': head.name, 'bytes': shape_bytes(result), 'arrays': len(_SHAPE.findall(result)),
          'group': n, 'link_bytes': link_bytes(op, full, n)}


def _group_size(rest: str, devices: int) -> int:
  """The size of an op's device groups: replica_groups={{0,1},{2,3}} (the first group),
  [2,2]<=[4] (iota: groups x size), mesh['axis_0'=4,'axis_1'=1] {'axis_0'} (the named axes; a
  device_ids=... between them orders the devices, not the groups' size), {} (every device); 1
  without groups (a collective-permute)."""
  m = _GROUPS.search(rest)
  if not m:
    return 1
  g = m.group(1)
  if g == '{}':
    return devices
  if g.startswith('{{'):
    return len([d for d in g[2:-1].split(',') if d])
  if g.startswith('['):
    return int(g[1:].split(',')[1].split(']')[0])
  sizes = dict(_MESH_AXIS.findall(g))
  return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", g.split('{', 1)[1]))


def link_bytes(op: str, full: float, n: int) -> float:
  """Bytes one device sends over its links for a ring collective over n devices of an array
  of `full` bytes (an all-gather's gathered array, a reduce-scatter's input)."""
  if op == 'collective-permute':
    return float(full)
  share = (n - 1) / n if n > 1 else 0.0
  return 2 * share * full if op == 'all-reduce' else share * full


def loop_trips_cost(hlo) -> dict:
  """{'flops', 'bytes_accessed'} of the loop trips XLA's cost analysis leaves out: it counts a
  while loop's body once, so a scan over 24 layers would show one layer's cost. For every
  computation run k > 1 times (multiplier), k - 1 more of: its matmul FLOPs (2 x output x
  contracted size of each dot, fused ones included; a TPU program's matmuls are convolutions,
  left out: vlp.compile.programs floors the compute bound with the model's FLOPs), and for a
  loop body the bytes its instructions read and write (_traffic, as XLA counts a top-level
  instruction)."""
  program, flops, nbytes = _program(hlo), 0.0, 0.0
  for comp, instrs in program.instrs.items():
    extra = program.multiplier(comp) - 1
    if extra <= 0:
      continue
    for ins in instrs:
      if ins.op == 'dot':
        flops += extra * _dot_flops(program, ins)
      if comp in program.trips and comp not in program.fused and ins.op not in _NO_TRAFFIC:
        nbytes += extra * _traffic(program, ins)
  return {'flops': flops, 'bytes_accessed': nbytes}


def _traffic(program, ins) -> int:
  """Bytes a top-level instruction reads and writes, in tiled bytes as XLA's TPU cost
  analysis counts them. A loop body slices its layer's params out of the stacked ones and
  writes its activations into stacked buffers in place: a dynamic slice reads its slice, an
  update in place writes its update (in a fusion too), not the whole stack. A TPU
  continuation fusion of an async collective passes the collective's buffers on (output
  aliased to operand): it moves its own operands and results only, the buffers being the
  start's and the done's (so an unrolled program's count has them once, not once a piece)."""
  args = ins.args
  size = lambda v: shape_bytes(_type(program, v), tiled=True)
  if ins.op in _ASYNC_MOVES:  # XLA counts an async copy 4x its buffer (start and done each 2x)
    return 4 * shape_bytes(ins.type, tiled=True) if ins.op.endswith('-done') else 0
  if ins.op == 'dynamic-slice':
    return 2 * shape_bytes(ins.type, tiled=True)
  if ins.op == 'dynamic-update-slice':
    return 2 * size(args[1])
  reads, out = {i: size(a) for i, a in enumerate(args)}, shape_bytes(ins.type, tiled=True)
  fused = _FUSED.findall(ins.rest) if ins.op == 'fusion' else []
  body = program.instrs.get(fused[0], []) if fused else []
  params = {i.name: int(i.rest.split(')', 1)[0]) for i in body if i.op == 'parameter'}
  pieces = _pieces(program, ins) if fused else []
  if pieces and _role(program, ins, pieces) == 'continues':
    root = program.defs[program.roots[fused[0]]]
    passed = {v for p in pieces for v in p.args} | set(root.args)
    reads = {i: b for i, b in reads.items() if not any(params.get(v) == i for v in passed)}
    out = sum(size(v) for v in root.args if v not in params and v not in {p.name for p in pieces})
  for i in body:
    inner = i.args
    if i.op in ('dynamic-slice', 'dynamic-update-slice') and inner and params.get(inner[0]) in reads:
      reads[params[inner[0]]] = shape_bytes(i.type, tiled=True) if i.op == 'dynamic-slice' else 0
      if i.op == 'dynamic-update-slice' and i.name == program.roots.get(fused[0]):
        out = size(inner[1])
  return out + sum(reads.values())


def _dot_flops(program, ins) -> float:
  lhs = ins.args[:1]
  dims = _SHAPE.findall(_type(program, lhs[0])) if lhs else []
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', ins.rest)
  if not dims or not contracting:
    return 0.0
  lhs_dims = [int(d) for d in dims[0][1].split(',') if d]
  k = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(',') if i)
  out = _SHAPE.findall(ins.type)
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
