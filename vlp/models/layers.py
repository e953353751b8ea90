"""Transformer building blocks with logical axis names on every parameter.

Logical names ('embed', 'mlp', 'heads', 'kv', 'vocab', ...) are mapped to mesh
axes by the rules table in vlp.core.parallel; the modules never name mesh axes.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.core import parallel
from vlp.models import moe as moe_lib, stacks
from vlp.models.params import param

MAX_LOGIT_SCALE = 100.0  # as CLIP: keeps a runaway temperature from destabilising training


@dataclasses.dataclass(frozen=True)
class Arch:
  """The choices in which the papers' Transformers differ (config `model.arch`).

  init: 'xavier' (Xavier-uniform kernels, as BERT/ViT ports commonly do) or 'clip'
    (CLIP's scaled normals: QKV std width^-0.5, MLP input (2 width)^-0.5, both output
    projections width^-0.5 (2 depth)^-0.5, so the residual stream does not grow with
    depth); gelu: 'tanh' (the tanh approximation), 'erf' (exact, as torch's default) or
    'quick' (x sigmoid(1.702 x), OpenAI CLIP's QuickGELU);
  ln_eps: LayerNorm epsilon (1e-6 in big_vision's ViT, 1e-5 in torch and CLIP).
  """
  init: str = 'xavier'
  gelu: str = 'tanh'
  ln_eps: float = 1e-6
  attention: str = 'xla'  # how attention is computed (config model.attention, not the paper's: _attend)

  def kernel(self, role: str, width: int, depth: int, xavier):
    """The initializer of a `role` kernel ('qkv', 'mlp_in', 'out' of a block of a `depth` stack;
    'proj' a tower's output projection): with init 'xavier', `xavier`."""
    if self.init != 'clip':
      return xavier
    std = {'qkv': width ** -0.5, 'proj': width ** -0.5, 'mlp_in': (2 * width) ** -0.5,
           'out': width ** -0.5 * (2 * depth) ** -0.5}[role]
    return nnx.initializers.normal(std)

  def activation(self, x):
    if self.gelu == 'quick':
      return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=self.gelu == 'tanh')


ARCH_CHOICES = {'init': ('xavier', 'clip'), 'gelu': ('tanh', 'erf', 'quick')}


def arch_of(model_cfg) -> Arch:
  """The Arch of a model config, with its attention implementation; configs exported before
  `model.arch` or `model.attention` existed get the old ones."""
  return Arch(**model_cfg.get('arch', {}), attention=model_cfg.get('attention', 'xla'))


def l2_normalize(x):
  """Unit rows in float32 (embeddings are compared by cosine similarity)."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class Dense(nnx.Module):
  """y = x @ W + b over the last axis of x, W with logical names (in_name, out_name)."""

  def __init__(self, d_in, d_out, names, *, rngs, use_bias=True, dtype=jnp.float32, init=None):
    self.kernel = param(rngs, init or nnx.initializers.xavier_uniform(), (d_in, d_out), names)
    self.bias = param(rngs, nnx.initializers.zeros, (d_out,), names[1:]) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype (bf16 variance is lossy)."""

  def __init__(self, width, *, rngs, eps=1e-6, dtype=jnp.float32, names=('embed',)):
    self.scale = param(rngs, nnx.initializers.ones, (width,), names)
    self.bias = param(rngs, nnx.initializers.zeros, (width,), names)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    with jax.named_scope('layer_norm'):  # profiles count it as normalisation (vlp.bench.categories)
      x32 = x.astype(jnp.float32)
      mean = x32.mean(-1, keepdims=True)
      var = jnp.square(x32 - mean).mean(-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
      return y.astype(self.dtype)


def fused_attention(impl: str) -> bool:
  """Whether attention of implementation `impl` (config model.attention) is jax.nn.dot_product_attention:
  'dot_product_attention' always (cuDNN's fused kernel on a GPU where it applies, else XLA's
  ops), 'auto' on GPUs only; 'xla' never. On TPU, Pallas's flash attention compiled with
  `vlp compile` accesses fewer bytes only from about 1000 tokens, longer than vlp's sequences
  (docs/results.md#compile-pallas-attention), so 'auto' keeps XLA's ops there."""
  return impl == 'dot_product_attention' or (impl == 'auto' and jax.default_backend() == 'gpu')


def _attend(q, k, v, mask, out, out_bias, dt, impl='xla'):
  """Scaled dot-product attention of q [B, L, H, K] to k, v [B, S, H, K], then the output
  projection out [H, K, D]; mask bool, True where a key may be attended to: [B, S] (the same
  keys for every query) or [B, L, S] (per query, e.g. causal). impl: model.attention."""
  # heads split over `tensor`: each device attends with its own heads
  q, k, v = (parallel.constrain(t, ('batch', None, 'heads', None)) for t in (q, k, v))
  if mask is not None:
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]  # [B, heads, L, S]
  with jax.named_scope('attention'):  # q.k, mask, softmax, weights.v: profiles' 'attention' (vlp.bench.categories)
    if fused_attention(impl):
      y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
      logits = jnp.einsum('bqhk,bshk->bhqs', q, k) * (q.shape[-1] ** -0.5)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dt)
      y = jnp.einsum('bhqs,bshk->bqhk', weights, v)
  return jnp.einsum('bqhk,hkd->bqd', y, out.astype(dt)) + out_bias.astype(dt)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with one fused QKV matmul.

  The QKV kernel is [embed, 3, heads, head_dim] so that tensor parallelism can
  split heads without splitting a head. qk_norm: LayerNorm of queries and keys
  over each head's dimensions (Dehghani et al. 2023; IMP's MoE models), which
  keeps attention logits from growing without bound.
  """

  def __init__(self, width, num_heads, *, rngs, dtype=jnp.float32, qk_norm=False, arch=Arch(), depth=1):
    head_dim = width // num_heads
    init = arch.kernel('qkv', width, depth,
                       nnx.initializers.xavier_uniform(in_axis=0, out_axis=(2, 3), batch_axis=(1,)))
    self.qkv = param(rngs, init, (width, 3, num_heads, head_dim), ('embed', None, 'heads', 'kv'))
    self.qkv_bias = param(rngs, nnx.initializers.zeros, (3, num_heads, head_dim), (None, 'heads', 'kv'))
    out_init = arch.kernel('out', width, depth, nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2))
    self.out = param(rngs, out_init, (num_heads, head_dim, width), ('heads', 'kv', 'embed'))
    self.out_bias = param(rngs, nnx.initializers.zeros, (width,), ('embed',))
    norm = lambda: LayerNorm(head_dim, rngs=rngs, dtype=dtype, names=('kv',), eps=arch.ln_eps)
    self.q_norm, self.k_norm = (norm(), norm()) if qk_norm else (None, None)
    self.dtype, self.impl = dtype, arch.attention

  def __call__(self, x, mask=None, keep=None):
    """x: [B, L, D]; mask: [B, L] or [B, L, L] bool, True where a key may be attended to;
    keep: None, or int [B], one position per example whose output alone is computed: [B, 1, D]
    (every token is still a key and a value)."""
    dt = self.dtype
    kernel, bias = self.qkv[...].astype(dt), self.qkv_bias[...].astype(dt)
    if keep is None:
      q, k, v = jnp.einsum('bld,dthk->tblhk', x.astype(dt), kernel) + bias[:, None, None]
    else:
      k, v = jnp.einsum('bld,dthk->tblhk', x.astype(dt), kernel[:, 1:]) + bias[1:, None, None]
      q = jnp.einsum('bld,dhk->blhk', pick(x, keep).astype(dt), kernel[:, 0]) + bias[0]
      mask = pick(mask, keep) if mask is not None and mask.ndim == 3 else mask
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return _attend(q, k, v, mask, self.out[...], self.out_bias[...], dt, self.impl)


class CrossAttention(nnx.Module):
  """Multi-head attention of queries x [B, L, D] to another sequence kv [B, S, D_kv]
  (ALBEF's fusion layers: text queries, image-token keys and values)."""

  def __init__(self, width, kv_width, num_heads, *, rngs, dtype=jnp.float32, arch=Arch(), depth=1):
    head_dim = width // num_heads
    q_init = arch.kernel('qkv', width, depth, nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)))
    self.q = param(rngs, q_init, (width, num_heads, head_dim), ('embed', 'heads', 'kv'))
    self.q_bias = param(rngs, nnx.initializers.zeros, (num_heads, head_dim), ('heads', 'kv'))
    init = arch.kernel('qkv', kv_width, depth,
                       nnx.initializers.xavier_uniform(in_axis=0, out_axis=(2, 3), batch_axis=(1,)))
    self.kv = param(rngs, init, (kv_width, 2, num_heads, head_dim), ('embed', None, 'heads', 'kv'))
    self.kv_bias = param(rngs, nnx.initializers.zeros, (2, num_heads, head_dim), (None, 'heads', 'kv'))
    out_init = arch.kernel('out', width, depth, nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2))
    self.out = param(rngs, out_init, (num_heads, head_dim, width), ('heads', 'kv', 'embed'))
    self.out_bias = param(rngs, nnx.initializers.zeros, (width,), ('embed',))
    self.dtype, self.impl = dtype, arch.attention

  def __call__(self, x, kv):
    dt = self.dtype
    q = jnp.einsum('bld,dhk->blhk', x.astype(dt), self.q[...].astype(dt)) + self.q_bias[...].astype(dt)
    kv = jnp.einsum('bsd,dthk->tbshk', kv.astype(dt), self.kv[...].astype(dt))
    kv = kv + self.kv_bias[...].astype(dt)[:, None, None]
    return _attend(q, kv[0], kv[1], None, self.out[...], self.out_bias[...], dt, self.impl)


class Mlp(nnx.Module):
  def __init__(self, width, mlp_dim, *, rngs, dtype=jnp.float32, arch=Arch(), depth=1):
    xavier = nnx.initializers.xavier_uniform()
    self.fc1 = Dense(width, mlp_dim, ('embed', 'mlp'), rngs=rngs, dtype=dtype,
                     init=arch.kernel('mlp_in', width, depth, xavier))
    self.fc2 = Dense(mlp_dim, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype,
                     init=arch.kernel('out', width, depth, xavier))
    self.arch = arch

  def __call__(self, x):
    return self.fc2(parallel.constrain(self.arch.activation(self.fc1(x)), ('batch', None, 'mlp')))


def _mlp(width, mlp_dim, rngs, dtype, moe, arch=Arch(), depth=1):
  """A dense MLP, or with `moe` (MoeMlp keyword arguments) a Mixture-of-Experts."""
  if moe:  # the experts take the arch's GELU; their kernels stay Xavier whatever arch.init
    return moe_lib.MoeMlp(width, mlp_dim, rngs=rngs, dtype=dtype, activation=arch.activation, **moe)
  return Mlp(width, mlp_dim, rngs=rngs, dtype=dtype, arch=arch, depth=depth)


def pick(x, keep):
  """x [B, L, ...] at one position per example, keep int [B] -> [B, 1, ...]."""
  return jnp.take_along_axis(x, keep.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)


def residual(x, layer, norm, post_ln: bool, keep=None):
  """x + layer(norm(x)) (pre-LN, as ViT and CLIP), or norm(x + layer(x)) (post-LN, as BERT);
  with keep (int [B]), only those positions' outputs [B, 1, D], `layer` taking keep too."""
  if keep is None:
    return norm(x + layer(x)) if post_ln else x + layer(norm(x))
  kept = pick(x, keep)
  return norm(kept + layer(x, keep)) if post_ln else kept + layer(norm(x), keep)


class Block(nnx.Module):
  """Transformer block, pre-LayerNorm or (`post_ln`, BERT's layout) post-LayerNorm; `moe`
  (vlp.models.moe.MoeMlp keyword arguments with num_experts) replaces its MLP by a
  Mixture-of-Experts."""

  def __init__(self, width, num_heads, mlp_dim, *, rngs, dtype=jnp.float32, moe=None, qk_norm=False,
               arch=Arch(), depth=1, post_ln=False):
    self.ln1 = LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps)
    self.attn = SelfAttention(width, num_heads, rngs=rngs, dtype=dtype, qk_norm=qk_norm, arch=arch, depth=depth)
    self.ln2 = LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps)
    self.mlp = _mlp(width, mlp_dim, rngs, dtype, moe, arch, depth)
    self.post_ln = post_ln

  def __call__(self, x, mask=None, keep=None):
    """x [B, L, D] -> [B, L, D]; with keep (int [B]), the output at those positions alone, [B, 1, D]."""
    x = parallel.constrain(x, ('batch', None, None))
    x = residual(x, lambda h, keep=None: self.attn(h, mask, keep), self.ln1, self.post_ln, keep)
    return residual(x, self.mlp, self.ln2, self.post_ln)


class FusionBlock(nnx.Module):
  """Block with cross-attention to other tokens between self-attention and MLP (the layout of
  ALBEF's fusion layers, BERT's layers with `add_cross_attention`); `moe` and `post_ln` as
  for Block."""

  def __init__(self, width, num_heads, mlp_dim, kv_width, *, rngs, dtype=jnp.float32, moe=None, arch=Arch(),
               depth=1, post_ln=False):
    norm = lambda: LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps)
    self.ln1 = norm()
    self.attn = SelfAttention(width, num_heads, rngs=rngs, dtype=dtype, arch=arch, depth=depth)
    self.ln_cross = norm()
    self.cross = CrossAttention(width, kv_width, num_heads, rngs=rngs, dtype=dtype, arch=arch, depth=depth)
    self.ln2 = norm()
    self.mlp = _mlp(width, mlp_dim, rngs, dtype, moe, arch, depth)
    self.post_ln = post_ln

  def __call__(self, x, mask, kv):
    x = parallel.constrain(x, ('batch', None, None))
    x = residual(x, lambda h: self.attn(h, mask), self.ln1, self.post_ln)
    x = residual(x, lambda h: self.cross(h, kv), self.ln_cross, self.post_ln)
    return residual(x, self.mlp, self.ln2, self.post_ln)


# What a rematerialised block keeps for the backward pass: 'full' only its
# input, 'dots_saveable' the matmul outputs (elementwise ops are recomputed).
REMAT_POLICIES = {'full': None, 'dots_saveable': jax.checkpoint_policies.dots_saveable}


def moe_blocks(depth: int, moe) -> list[bool]:
  """Which blocks of a stack are MoE: every `every`-th (the every-th, 2*every-th, ...), among
  the last `last` blocks when last > 0 (IMP: the last 6); none when num_experts is 0."""
  if not moe or not moe.get('num_experts'):
    return [False] * depth
  first = depth - moe['last'] if moe.get('last') else 0
  return [i >= first and (i - first + 1) % moe['every'] == 0 for i in range(depth)]


def moe_kwargs(moe):
  return {k: moe[k] for k in ('num_experts', 'router', 'k', 'capacity_factor', 'batch_priority')}


class Encoder(nnx.Module):
  """A stack of blocks followed by a final LayerNorm; `remat` names a policy or 'none';
  `scan` stores each run of consecutive blocks of one structure stacked, and runs it as one
  lax.scan (block_stack, run_blocks);
  `moe` (config model.<tower>.moe) makes some blocks Mixture-of-Experts (moe_blocks);
  `qk_norm` normalises queries and keys in every block."""

  def __init__(self, width, depth, num_heads, mlp_dim, *, rngs, dtype=jnp.float32, remat='none', scan=False,
               moe=None, qk_norm=False, arch=Arch()):
    self.blocks = block_stack([
        Block(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype, moe=moe_kwargs(moe) if is_moe else None,
              qk_norm=qk_norm, arch=arch, depth=depth)
        for is_moe in moe_blocks(depth, moe)], scan)
    self.ln = LayerNorm(width, rngs=rngs, dtype=dtype, eps=arch.ln_eps)
    self.remat, self.scan = remat, scan

  def __call__(self, x, mask=None, keep=None):
    """x [B, L, D] -> [B, L, D]. keep: None, or the one position per example whose output alone
    is wanted (an int, or int [B]) -> [B, D]. A tower pooled at one token needs no other output
    of its last block, so that block computes the other tokens' keys and values only: the same
    pooled feature and gradients for most of a block less work (open_clip and big_vision compute
    the whole block). MoE blocks route over all tokens, so a last MoE block runs whole."""
    if keep is None:
      return self.ln(run_blocks(self.blocks, x, mask, remat=self.remat))
    keep = jnp.broadcast_to(jnp.asarray(keep, jnp.int32) % x.shape[1], x.shape[:1])
    body, last = _split_last(self.blocks)
    if isinstance(getattr(last, 'mlp', None), moe_lib.MoeMlp):
      return pick(self(x, mask), keep)[:, 0]
    x = run_blocks(body, x, mask, remat=self.remat)
    return self.ln(remat_apply(self.remat)(last, x, mask, keep))[:, 0]


def block_stack(blocks: list, scan: bool):
  """The container of a stack's blocks, as their params are stored. Unscanned: an nnx.List,
  block i's params under i. Scanned: an nnx.Dict holding each run of consecutive like blocks
  (_runs) as one block whose params have a leading axis over the run, under its run key
  ('0-11': vlp.models.stacks), and any other block (an MoE block, a run of one) under its
  index. The step scans the stored stack instead of stacking per-block params every step.
  The blocks are made one by one either way, so a seed gives the same params in both layouts."""
  if not scan:
    return nnx.List(blocks)
  out, first = {}, 0
  for run in _runs(blocks):
    last = first + len(run) - 1
    out[str(first) if len(run) == 1 else stacks.run_key(first, last)] = run[0] if len(run) == 1 else _stacked(run)
    first = last + 1
  return nnx.Dict(out)


def _stacked(run):
  """One block whose every param stacks the run's blocks' params on a new leading axis, its
  logical names led by stacks.LAYERS (replicated: each device holds its shard of every block)."""
  def stack(*variables):
    names = variables[0].get_metadata()['out_sharding']
    return variables[0].replace(jnp.stack([v[...] for v in variables]), out_sharding=(stacks.LAYERS, *names))
  states = [nnx.state(b) for b in run]
  return nnx.merge(nnx.graphdef(run[0]), jax.tree.map(stack, *states, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def _entries(blocks) -> list[tuple[str, nnx.Module]]:
  """(key, block) of a block container in order; a key is a block's index or a run key.
  (nnx orders a Dict's keys as strings, '10' before '2', and may hold other attributes:
  nnx.capture's.)"""
  if isinstance(blocks, list):
    return blocks
  items = blocks.items() if isinstance(blocks, nnx.Dict) else enumerate(blocks)
  entries = [(str(k), b) for k, b in items if stacks.is_block_key(k)]
  return sorted(entries, key=lambda kb: int(kb[0].split('-')[0]))


def _split_last(blocks):
  """(entries of every block but the last, the last block): a stored run's last block is
  sliced off it."""
  *body, (key, last) = _entries(blocks)
  run = stacks.run_range(key)
  if run is None:
    return body, last
  graphdef, state = nnx.split(last)
  head = nnx.merge(graphdef, jax.tree.map(lambda a: a[:-1], state))
  body.append((stacks.run_key(run[0], run[1] - 1), head))
  return body, nnx.merge(graphdef, jax.tree.map(lambda a: a[-1], state))


def stacking(model_cfg) -> dict:
  """How a model config runs its block stacks: the towers' `remat` and `scan` keywords
  (exported configs of inference models have neither key)."""
  return {'remat': model_cfg.get('remat', 'none'), 'scan': model_cfg.get('scan_layers', False)}


def run_blocks(blocks, x, *args, remat: str = 'none'):
  """x through the blocks in order, each called as block(x, *args).

  blocks: a block_stack container (or a list of its (key, block) entries). remat: the policy
  (REMAT_POLICIES) rematerialising each block, or 'none'. A stored run of like blocks is one
  lax.scan over its stacked params, so the compiler sees one block however deep the stack
  (MaxText's scan_layers): a paper-size model compiles in minutes instead of most of an hour.
  The math is the same; MoE blocks stay unrolled, as they sow their auxiliary losses."""
  apply = remat_apply(remat)
  for key, block in _entries(blocks):
    x = _scan_run(block, x, args, remat) if stacks.run_range(key) else apply(block, x, *args)
  return x


def _runs(blocks) -> list[list]:
  runs, kinds = [], []
  for block in blocks:
    kind = None if isinstance(getattr(block, 'mlp', None), moe_lib.MoeMlp) else nnx.graphdef(block)
    if runs and kind is not None and kinds[-1] == kind:
      runs[-1].append(block)
    else:
      runs.append([block])
      kinds.append(kind)
  return runs


def _scan_run(stacked, x, args, remat):
  """x through a stored run (a block with stacked params) as one lax.scan over its params."""
  graphdef, params, rest = nnx.split(stacked, nnx.Param, ...)  # rest: e.g. nnx.capture's empty slots

  def body(h, params):
    return nnx.merge(graphdef, params, rest)(h, *args), None

  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(body, x, params)[0]


def remat_apply(remat):
  """`apply(block, *args)` calling the block, rematerialised with policy `remat` unless 'none'."""
  apply = lambda block, *args: block(*args)
  return apply if remat == 'none' else nnx.remat(apply, policy=REMAT_POLICIES[remat])
