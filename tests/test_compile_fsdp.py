"""`vlp compile` on programs compiled for TPU with FSDP: one of vlp's towers
(vlp.models.layers.Encoder of width 256, bf16 compute, every block rematerialised), its params
sharded by vlp's rules over fsdp=4 on v5e:2x2 and the batch over the same axis, its gradient
compiled with the blocks unrolled and scanned (about 10 s a pair). The collectives are counted
by hand from the tower's params, for the TPU compiler as a test process starts it: without the
FSDP flags `vlp compile` gives it (vlp.core.compiler_flags), which change what it emits. Needs
libtpu."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from vlp.compile import hlo, programs, target
from vlp.core import chips

pytestmark = pytest.mark.skipif(not target.have_libtpu(), reason="libtpu not installed: pip install -e '.[tpu]'")

WIDTH, DEPTH, HEADS, HEAD_DIM, MLP, FSDP = 256, 3, 4, 64, 1024, 4
BATCH, TOKENS = 16, 32
# A block's params (vlp.models.layers.Block) by vlp's rules: the weight matrices and the vectors
# of width WIDTH have an 'embed' axis, sharded over fsdp; two biases have none, replicated.
MATRICES = {'qkv': (WIDTH, 3, HEADS, HEAD_DIM), 'out': (HEADS, HEAD_DIM, WIDTH), 'fc1': (WIDTH, MLP),
            'fc2': (MLP, WIDTH)}
SHARDED_VECTORS = ('ln1.scale', 'ln1.bias', 'ln2.scale', 'ln2.bias', 'out_bias', 'fc2.bias')  # [WIDTH] each
REPLICATED = {'qkv_bias': (3, HEADS, HEAD_DIM), 'fc1.bias': (MLP,)}
FINAL_LN = ('ln.scale', 'ln.bias')  # the stack's last LayerNorm, [WIDTH], sharded
BF16, F32 = 2, 4


def _compile(scan: bool, depth: int = DEPTH, param_dtype=jnp.float32):
  """(the compiled gradient of sum(tower(x)^2), the abstract params with their shardings)."""
  from flax import nnx

  from vlp.core import parallel
  from vlp.models import layers

  mesh = parallel.make_mesh({'data': 1, 'fsdp': FSDP, 'tensor': 1, 'expert': 1},
                            target.topology_devices(chips.parse('v5e:2x2')))
  tower = nnx.eval_shape(lambda: layers.Encoder(WIDTH, depth, HEADS, MLP, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                scan=scan, remat='full'))
  graphdef, state = nnx.split(tower, nnx.Param)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), nnx.to_pure_dict(state))
  shardings = parallel.tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(state)), shapes, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  batch = jax.ShapeDtypeStruct((BATCH, TOKENS, WIDTH), jnp.bfloat16, sharding=parallel.batch_sharding(mesh))
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x).astype(jnp.float32) ** 2)
  with parallel.activation_rules(mesh, parallel.RULES):
    return jax.jit(jax.grad(loss), out_shardings=shardings).lower(params, batch).compile(), params


@pytest.fixture(scope='module')
def stack():
  """{scan: (compiled, abstract params)}: the tower of DEPTH blocks, fp32 params, unrolled (False)
  and scanned (True)."""
  return {scan: _compile(scan) for scan in (False, True)}


def test_the_listed_params_are_the_towers(stack):
  """The hand counts below start from this list: check it against the model and its shardings."""
  _, params = stack[False]
  got = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    if keys[0] == 'blocks':  # blocks.0.attn.qkv -> qkv, blocks.0.mlp.fc1.bias -> fc1.bias
      keys = [k for k in keys[2:] if k not in ('attn', 'mlp', 'kernel')]
    name = '.'.join(keys)
    got.setdefault(name, set()).add((x.shape, 'fsdp' in str(x.sharding.spec)))
  want = {**{k: {(s, True)} for k, s in MATRICES.items()}, **{k: {((WIDTH,), True)} for k in SHARDED_VECTORS},
          **{k: {(s, False)} for k, s in REPLICATED.items()}, **{k: {((WIDTH,), True)} for k in FINAL_LN}}
  assert got == want


def _by_hand(scan: bool) -> dict:
  """{op: (ops, arrays, result bytes)} per device per step, from the params above.

  FSDP from first principles: every sharded param is gathered for the forward pass and again
  for the backward pass's recomputation of its block (remat 'full'); every param's gradient
  is reduced once (the batch is split over the same devices). What XLA does beyond that, each
  accounted for here:
  - it gathers the matrices with all-gathers, the vectors with all-reduces (each device adds
    its shard into zeros: its way with small arrays), in the dtype the model uses them in (the
    LayerNorms' f32, the biases' bf16);
  - the recomputation leaves out fc2 and its bias (their output is the block's output, which
    the backward pass does not need); the input gradient's matmuls need the four matrices
    again: out and fc1 use the recomputation's gathers, fc2 is gathered a second time and qkv
    (whose gradient comes last) a third: 5 matrix and 5 vector gathers in the backward;
  - it reduce-scatters the gradients of qkv, fc1 and fc2, and all-reduces out's (whole: each
    device keeps its part) with the vectors';
  - the final LayerNorm, not rematerialised, is gathered once for both passes;
  - its combiners make one op of the arrays of one kind and dtype that are ready together.
    Scanned, a trip: the 3 matrix gradients (one reduce-scatter); the forward vector gathers,
    the backward ones and the gradients, each split bf16 / f32 (6 all-reduces; out's gradient
    with the bf16 ones); after the loop, the replicated biases' gradients (summed over the
    trips: 2 stacked arrays), the final LayerNorm's gathers and its gradients (3 all-reduces).
    Unrolled: all blocks' matrix gradients in one reduce-scatter; all forward vector gathers
    in 2 all-reduces (bf16; f32 with the final LayerNorm's), the backward ones in 2 a block,
    all gradients in 2.
  It combines no all-gather (each is overlapped with the matmul that needs it)."""
  matrices = {k: math.prod(s) * BF16 for k, s in MATRICES.items()}
  bias, ln = WIDTH * BF16, WIDTH * F32
  gathered = 2 * sum(matrices.values()) + matrices['qkv']  # a block's 4 forward and 5 backward gathers
  scattered = (matrices['qkv'] + matrices['fc1'] + matrices['fc2']) // FSDP  # each device's part
  vector_gathers = (2 * bias + 4 * ln) + (bias + 4 * ln)  # a block's 6 forward, 5 backward
  gradients = matrices['out'] + 2 * bias + 4 * ln  # a block's all-reduced gradients: out and 6 vectors
  replicated = sum(math.prod(s) * BF16 for s in REPLICATED.values())
  reduced = DEPTH * (vector_gathers + gradients + replicated) + 2 * ln + 2 * ln  # + the final LayerNorm's
  arrays_reduced = DEPTH * (11 + 7) + 2 * (1 if scan else DEPTH) + 2 + 2
  reduce_ops = DEPTH * 6 + 3 if scan else 2 + 2 * DEPTH + 2
  return {'all-gather': (DEPTH * 9, DEPTH * 9, DEPTH * gathered),
          'reduce-scatter': (DEPTH if scan else 1, DEPTH * 3, DEPTH * scattered),
          'all-reduce': (reduce_ops, arrays_reduced, reduced),
          'all-to-all': (0, 0, 0), 'collective-permute': (0, 0, 0)}


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_collectives_equal_a_count_by_hand(stack, scan):
  """Each logical collective once (an async one is a start, continuation fusions and a done;
  a reduce-scatter is a fusion of an all-reduce), once a trip in the scan; link bytes by ring
  over the 4 devices."""
  compiled, _ = stack[scan]
  program = hlo.Program(compiled.as_text())
  assert [(loop['trips'], loop['read']) for loop in program.loops] == (
      [(DEPTH, 'induction variable')] * 2 if scan else [])  # forward and backward scans
  logical = hlo.logical_collectives(program)
  total = lambda op, key: sum(c['runs'] * (c[key] if key else 1) for c in logical if c['op'] == op)
  got = {op: (total(op, None), total(op, 'arrays'), total(op, 'bytes')) for op in hlo.COLLECTIVES}
  assert got == _by_hand(scan)
  c, share = hlo.collectives(program), (FSDP - 1) / FSDP
  assert c['all-gather']['link_bytes'] == pytest.approx(share * c['all-gather']['bytes'])
  assert c['reduce-scatter']['link_bytes'] == pytest.approx(share * FSDP * c['reduce-scatter']['bytes'])
  assert c['all-reduce']['link_bytes'] == pytest.approx(2 * share * c['all-reduce']['bytes'])


def test_a_scanned_fsdp_stack_costs_about_what_the_unrolled_one_does():
  """With the scan's missed trips added back (hlo.loop_trips_cost: continuation fusions at their
  own bytes, arrays as tiled in memory), a scan over 6 blocks costs within 10% of what XLA
  counts for the same blocks unrolled. bf16 params: the scanned step stacks the blocks' params
  and unstacks their gradients, traffic the unrolled one has not (with fp32 master params
  converted on the way, 5-10% of this small stack's bytes), which would blur what is tested."""
  want, got = (programs.cost(c, c.as_text())['bytes_accessed']
               for c, _ in (_compile(scan, depth=6, param_dtype=jnp.bfloat16) for scan in (False, True)))
  assert 0.9 < got / want < 1.1


def test_ideal_fsdp_volume_by_hand(stack):
  """(fsdp-1)/fsdp of every sharded param, gathered twice (forward, remat's recomputation) and
  its gradient reduce-scattered once, all in bf16."""
  _, params = stack[True]
  config = ml_collections.ConfigDict({'model': {'dtype': 'bfloat16', 'param_dtype': 'float32', 'remat': 'full'}})
  block = sum(math.prod(s) for s in MATRICES.values()) + WIDTH * len(SHARDED_VECTORS)
  sharded = DEPTH * block + WIDTH * len(FINAL_LN)
  assert programs.ideal_fsdp_bytes(params, config) == pytest.approx((FSDP - 1) / FSDP * sharded * 3 * BF16)
  config.model.remat = 'none'
  assert programs.ideal_fsdp_bytes(params, config) == pytest.approx((FSDP - 1) / FSDP * sharded * 2 * BF16)
