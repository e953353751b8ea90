"""Op categories of a train step's profile: the HLO instructions of XLA's program, and torch's
operators, each put in one of CATEGORIES. Pure functions over text and names (no JAX, no torch).

An instruction a trace names (a fusion, a copy, a custom call, an all-reduce) is classified by
the opcodes it computes (a fusion: the instructions of the computations it calls) and by the
`jax.named_scope`s in their `op_name` metadata, in this order:
  collective      an all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute
  optimizer       anything under the 'optimizer' scope (vlp.train.step) without a dot
  matmul          a dot or convolution (a cuBLAS/oneDNN gemm custom call), or
  attention         one under the 'attention' scope (vlp.models.layers: q.k and weights.v)
  copy/transpose  nothing but data movement (copy, transpose, slice, concatenate, pad, ...)
  attention       the rest of the 'attention' scope: the mask and the softmax
  normalisation   the 'layer_norm' scope (vlp.models.layers.LayerNorm, forward and backward),
                  or, outside any scope, a reduction with an rsqrt
  other           reductions outside a norm (bias gradients, the loss's softmax, the gradient
                  norm), gathers and scatters (embedding lookups), sorts, rng, control flow
                  (a while loop's own time) and custom calls
  elementwise     everything else: arithmetic, GELU, casts, selects
torch's operators (the open_clip reference) fall in the same categories by their names
(`torch_category`).
"""
import re

from vlp.compile import hlo

CATEGORIES = ('matmul', 'attention', 'normalisation', 'elementwise', 'optimizer', 'copy/transpose', 'collective',
              'other')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
               'collective-broadcast', 'ragged-all-to-all')
DOTS = ('dot', 'convolution', 'ragged-dot')
MOVES = ('copy', 'transpose', 'slice', 'dynamic-slice', 'dynamic-update-slice', 'concatenate', 'pad', 'reverse',
         'copy-start', 'copy-done')
STRUCTURE = ('parameter', 'constant', 'broadcast', 'bitcast', 'reshape', 'tuple', 'get-tuple-element', 'iota')
OTHER = ('reduce', 'reduce-window', 'gather', 'scatter', 'sort', 'rng', 'rng-bit-generator',
         'rng-get-and-update-state', 'while', 'conditional', 'call', 'custom-call', 'infeed', 'outfeed',
         'select-and-scatter', 'cholesky', 'triangular-solve', 'fft', 'send', 'recv', 'send-done', 'recv-done',
         'after-all', 'partition-id', 'replica-id', 'top-k')
SCOPES = ('optimizer', 'attention', 'layer_norm')  # the named scopes the classifier reads

_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (?:.+?) ([a-z][a-z0-9\-]*)\(')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_CALLS = re.compile(r'\bcalls=\{?%?([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_MODULE = re.compile(r'^HloModule ([\w.\-]+)')
_WRAPPER = re.compile(r'^(?:[\w.]+\()+|\)+$')


def scopes(op_name: str) -> set:
  """The named scopes on an op_name's path: 'jit(f)/transpose(jvp(loss))/attention/dot_general'
  -> {'f', 'loss', 'attention', 'dot_general'} (autodiff's wrappers taken off)."""
  return {_WRAPPER.sub('', part) for part in op_name.split('/') if part}


def parse_hlo(text: str):
  """(module name, {instruction: (opcode, op_name, custom-call target, called computations)},
  {computation: [its instructions]}) of an HLO module's text (`compiled.as_text()`)."""
  module, comp, instrs, comps = '', None, {}, {}
  for line in text.splitlines():
    m = _MODULE.match(line)
    if m:
      module = m.group(1)
      continue
    m = hlo.COMPUTATION.match(line)
    if m:
      comp = m.group(1)
      comps[comp] = []
      continue
    m = _INSTR.match(line)
    if m and comp is not None:
      name, opcode = m.groups()
      op = _OP_NAME.search(line)
      target = _TARGET.search(line)
      instrs[name] = (opcode, op.group(1) if op else '', target.group(1) if target else '', _CALLS.findall(line))
      comps[comp].append(name)
  return module, instrs, comps


def _fused(name, instrs, comps, seen=None) -> list:
  """[(opcode, op_name, target)] of an instruction and of everything its fusion computes."""
  seen = set() if seen is None else seen
  opcode, op_name, target, calls = instrs[name]
  out = [(opcode, op_name, target)]
  if opcode == 'fusion':
    for comp in calls:
      if comp not in seen:
        seen.add(comp)
        for inner in comps.get(comp, ()):
          out += _fused(inner, instrs, comps, seen)
  return out


def _base(opcode: str) -> str:
  return opcode[:-len('-start')] if opcode.endswith('-start') else opcode[:-len('-done')] \
      if opcode.endswith('-done') else opcode


def category(ops) -> str:
  """The category of an instruction from [(opcode, op_name, custom-call target)] of what it
  computes (the instruction itself and, for a fusion, its fused instructions)."""
  compute = [(o, n, t) for o, n, t in ops if o not in STRUCTURE and o != 'fusion']
  if any(_base(o) in COLLECTIVES for o, _, _ in compute):
    return 'collective'
  gemm = [n for o, n, t in compute if o in DOTS or (o == 'custom-call' and re.search(r'gemm|matmul', t, re.I))]
  if not gemm and any('optimizer' in scopes(n) for _, n, _ in compute):
    return 'optimizer'
  if any(o == 'custom-call' and re.search(r'fmha|attention', t, re.I) for o, _, t in compute):
    return 'attention'
  if gemm:
    return 'attention' if any('attention' in scopes(n) for n in gemm) else 'matmul'
  if compute and all(o in MOVES for o, _, _ in compute):
    return 'copy/transpose'
  if any('attention' in scopes(n) for _, n, _ in compute):
    return 'attention'
  opcodes = {o for o, _, _ in compute}
  if any('layer_norm' in scopes(n) for _, n, _ in compute) or {'reduce', 'rsqrt'} <= opcodes:
    return 'normalisation'
  if opcodes & set(OTHER):
    return 'other'
  return 'elementwise' if compute else 'other'


def classify(hlo_text: str) -> tuple[str, dict]:
  """(module name, {instruction name: category}) for every instruction of an HLO module."""
  module, instrs, comps = parse_hlo(hlo_text)
  return module, {name: category(_fused(name, instrs, comps)) for name in instrs}


# torch operators (without the 'aten::' prefix, trailing '_' of in-place forms removed)
TORCH_MATMUL = ('mm', 'addmm', 'bmm', 'matmul', 'linear', 'baddbmm', 'addbmm', 'addmv', 'mv', 'dot', 'einsum',
                '_addmm_activation', 'convolution', '_convolution', 'conv2d', 'mkldnn_convolution',
                'convolution_backward', 'cudnn_convolution', 'mkldnn_linear')
TORCH_COPY = ('copy', 'contiguous', 'clone', 't', 'transpose', 'permute', 'reshape', 'view',
              'expand', 'cat', 'stack', 'slice', 'select', 'narrow', 'split', 'chunk', 'unbind', 'as_strided',
              '_reshape_alias', 'flatten', 'unsqueeze', 'squeeze', 'unflatten', 'repeat', 'unsafe_split',
              'split_with_sizes', '_unsafe_view', 'slice_backward', 'select_backward', 'fill', 'zero', 'zeros_like')
TORCH_ELEMENTWISE = ('add', 'sub', 'rsub', 'mul', 'div', 'neg', 'exp', 'log', 'pow', 'sqrt', 'rsqrt', 'tanh',
                     'sigmoid', 'gelu', 'gelu_backward', 'where', 'clamp', 'clamp_min', 'clamp_max', 'lerp',
                     'addcmul', 'addcdiv', 'maximum', 'minimum', 'abs', 'sign', 'reciprocal', 'masked_fill',
                     'threshold_backward', 'silu', 'erf', 'eq', 'ne', 'lt', 'gt', 'le', 'ge',
                     'to', '_to_copy')  # casts: XLA's convert
TORCH_SOFTMAX = ('softmax', '_softmax', '_softmax_backward_data', 'softmax_backward_data')  # not log_softmax
TORCH_ATTENTION = re.compile(r'scaled_dot_product|ScaledDotProduct|flash_attention|efficient_attention|fmha'
                             r'|cudnn_attention')


def torch_category(name: str, scope: str = '') -> str:
  """The category of a torch operator (an `aten::` name) run under `scope` ('optimizer': in the
  optimizer's step; 'attention': inside scaled_dot_product_attention; '' else).

  The loss's log_softmax / cross-entropy, embedding lookups and autograd's own nodes are
  'other', as the loss's reductions and the gathers are on the JAX side; a cast (to, _to_copy)
  is 'elementwise', as XLA's convert."""
  if scope == 'optimizer':
    return 'optimizer'
  op = name.split('::', 1)[-1].rstrip('_')
  if scope == 'attention' or op in TORCH_SOFTMAX or TORCH_ATTENTION.search(name):
    return 'attention'
  if re.search(r'nccl|c10d|all_reduce|allreduce|all_gather|reduce_scatter', name, re.I):
    return 'collective'
  if op in TORCH_MATMUL:
    return 'matmul'
  if 'layer_norm' in op:
    return 'normalisation'
  if op in TORCH_COPY:
    return 'copy/transpose'
  if op in TORCH_ELEMENTWISE or op.startswith('_foreach_'):
    return 'elementwise'
  return 'other'
