"""vlp.compile.hlo on hand-written HLO: what the TPU compiler's optimized programs hold (async
collectives in pieces, reduce-scatter fusions, windowed loops with u32 counters, device groups
in every notation), each counted by hand in the test. Needs no libtpu."""
import pytest

from vlp.compile import hlo

GATHERED = 256 * 128 * 2  # bf16[256,128]: the all-gather's result, 4 shards of bf16[64,128]

# One all-gather as the TPU compiler splits it, in a loop whose u32 counter runs 0, 2, 4, 6 (< 8):
# a start fusion, a continuation fusion (a multiply interleaved with the gather, the gather's
# buffers passed through it) and a done fusion, each holding the full all-gather.
TPU_ASYNC_LOOP = '''HloModule jit_step, num_partitions=8

%start_comp (sp0: bf16[64,128]) -> (bf16[64,128], bf16[256,128], u32[]) {
  %sp0 = bf16[64,128]{1,0} parameter(0)
  %ag.1 = bf16[256,128]{1,0} all-gather(%sp0), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %cc.1 = (bf16[64,128]{1,0}, bf16[256,128]{1,0}, u32[]) custom-call(%ag.1), custom_call_target="AsyncCollectiveStart"
}

%continue_comp (cp0: bf16[64,128], cp1: bf16[256,128], cp2: u32[], cp3: f32[32,128]) -> (f32[32,128], bf16[64,128], bf16[256,128], bf16[256,128], u32[]) {
  %cp0 = bf16[64,128]{1,0} parameter(0)
  %cp1 = bf16[256,128]{1,0} parameter(1)
  %cp2 = u32[] parameter(2)
  %cp3 = f32[32,128]{1,0} parameter(3)
  %ag.2 = bf16[256,128]{1,0} all-gather(%cp0), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}
  %sq = f32[32,128]{1,0} multiply(%cp3, %cp3)
  ROOT %ct = (f32[32,128]{1,0}, bf16[64,128]{1,0}, bf16[256,128]{1,0}, bf16[256,128]{1,0}, u32[]) tuple(%sq, %cp0, %cp1, %ag.2, %cp2)
}

%done_comp (dp0: bf16[64,128], dp1: bf16[256,128], dp2: u32[]) -> bf16[256,128] {
  %dp0 = bf16[64,128]{1,0} parameter(0)
  %dp1 = bf16[256,128]{1,0} parameter(1)
  %dp2 = u32[] parameter(2)
  %ag.3 = bf16[256,128]{1,0} all-gather(%dp0), channel_id=7, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %cc.3 = bf16[256,128]{1,0} custom-call(%dp0, %dp1, %ag.3, %dp2), custom_call_target="AsyncCollectiveDone"
}

%body (bstate: (u32[], bf16[64,128], f32[32,128])) -> (u32[], bf16[64,128], f32[32,128]) {
  %bstate = (u32[], bf16[64,128]{1,0}, f32[32,128]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%bstate), index=0
  %w = bf16[64,128]{1,0} get-tuple-element(%bstate), index=1
  %x = f32[32,128]{1,0} get-tuple-element(%bstate), index=2
  %start = (bf16[64,128]{1,0}, bf16[256,128]{1,0}, u32[]) fusion(%w), kind=kCustom, calls=%start_comp
  %s0 = bf16[64,128]{1,0} get-tuple-element(%start), index=0
  %s1 = bf16[256,128]{1,0} get-tuple-element(%start), index=1
  %s2 = u32[] get-tuple-element(%start), index=2
  %cont = (f32[32,128]{1,0}, bf16[64,128]{1,0}, bf16[256,128]{1,0}, bf16[256,128]{1,0}, u32[]) fusion(%s0, %s1, %s2, %x), kind=kOutput, calls=%continue_comp
  %k0 = f32[32,128]{1,0} get-tuple-element(%cont), index=0
  %k1 = bf16[64,128]{1,0} get-tuple-element(%cont), index=1
  %k2 = bf16[256,128]{1,0} get-tuple-element(%cont), index=2
  %k4 = u32[] get-tuple-element(%cont), index=4
  %done = bf16[256,128]{1,0} fusion(%k1, %k2, %k4), kind=kCustom, calls=%done_comp
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  ROOT %bout = (u32[], bf16[64,128]{1,0}, f32[32,128]{1,0}) tuple(%next, %w, %k0)
}

%cond (cstate: (u32[], bf16[64,128], f32[32,128])) -> pred[] {
  %cstate = (u32[], bf16[64,128]{1,0}, f32[32,128]{1,0}) parameter(0)
  %ci = u32[] get-tuple-element(%cstate), index=0
  %eight = u32[] constant(8)
  ROOT %lt = pred[] compare(%ci, %eight), direction=LT
}

ENTRY %main (ew: bf16[64,128], ex: f32[32,128]) -> (u32[], bf16[64,128], f32[32,128]) {
  %ew = bf16[64,128]{1,0} parameter(0)
  %ex = f32[32,128]{1,0} parameter(1)
  %zero = u32[] constant(0)
  %init = (u32[], bf16[64,128]{1,0}, f32[32,128]{1,0}) tuple(%zero, %ew, %ex)
  ROOT %loop = (u32[], bf16[64,128]{1,0}, f32[32,128]{1,0}) while(%init), condition=%cond, body=%body
}
'''


def test_tpu_async_collective_counts_once_per_trip():
  """Start, continuation and done are one all-gather; the u32 loop stepping by 2 runs it 4 times."""
  program = hlo.Program(TPU_ASYNC_LOOP)
  assert program.loops == [{'while': 'loop', 'body': 'body', 'trips': 4, 'read': 'induction variable'}]
  [ag] = hlo.logical_collectives(program)
  assert (ag['op'], ag['name'], ag['runs'], ag['bytes'], ag['arrays'], ag['group']) == (
      'all-gather', 'start', 4, GATHERED, 1, 4)  # [2,4]<=[8]: 2 groups of 4
  c = hlo.collectives(TPU_ASYNC_LOOP)
  assert c['all-gather'] == {'count': 4, 'bytes': 4 * GATHERED, 'link_bytes': 4 * 3 / 4 * GATHERED}
  assert all(c[op]['count'] == 0 for op in hlo.COLLECTIVES if op != 'all-gather')


def test_a_loop_costs_continuation_fusions_by_their_own_bytes():
  """XLA counts the loop body once; the 3 trips it misses cost what the body's instructions
  move, the continuation fusion its multiply alone (the gather's buffers pass through it)."""
  w, full, flag, x = 64 * 128 * 2, GATHERED, 4, 32 * 128 * 4
  start = w + (w + full + flag)  # reads the shard, writes (shard, gathered buffer, flag)
  continuation = x + x  # reads x, writes x * x
  done = (w + full + flag) + full  # reads the buffers, writes the gathered array
  counter = 3 * 4  # the u32 add: two reads, one write
  assert hlo.loop_trips_cost(TPU_ASYNC_LOOP) == {'flops': 0.0, 'bytes_accessed': 3 * (start + continuation + done + counter)}


def _module(ops: str, partitions: int = 4) -> str:
  return (f'HloModule m, num_partitions={partitions}\n\n'
          '%add (x: f32[], y: f32[]) -> f32[] {\n  %x = f32[] parameter(0)\n  %y = f32[] parameter(1)\n'
          '  ROOT %sum = f32[] add(%x, %y)\n}\n\n' + ops)


ASYNC_OPS = _module('''%rs_wrapped (w0: f32[64,32]) -> f32[16,32] {
  %w0 = f32[64,32]{1,0} parameter(0)
  ROOT %rs.1 = f32[16,32]{1,0} reduce-scatter(%w0), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

%all-reduce-scatter.1 (input: f32[64,32]) -> f32[32,32] {
  %input = f32[64,32]{1,0} parameter(0)
  %ar.1 = f32[64,32]{1,0} all-reduce(%input), channel_id=4, replica_groups={{0,1},{2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %rows = u32[] constant(32)
  %offset = u32[] multiply(%pid, %rows)
  %col = u32[] constant(0)
  ROOT %mine = f32[32,32]{1,0} dynamic-slice(%ar.1, %offset, %col), dynamic_slice_sizes={32,32}
}

ENTRY %main (a: f32[64,32]) -> f32[64,32] {
  %a = f32[64,32]{1,0} parameter(0)
  %ag-start = (f32[64,32]{1,0}, f32[256,32]{1,0}) all-gather-start(%a), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %ag-done = f32[256,32]{1,0} all-gather-done(%ag-start)
  %rs-start = ((f32[64,32]{1,0}), f32[16,32]{1,0}, s32[]) async-start(%a), calls=%rs_wrapped
  %rs-update = ((f32[64,32]{1,0}), f32[16,32]{1,0}, s32[]) async-update(%rs-start)
  %rs-done = f32[16,32]{1,0} async-done(%rs-update)
  %scattered = f32[32,32]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.1
  %ar-start = f32[64,32]{1,0} all-reduce-start(%a), channel_id=5, replica_groups={}, to_apply=%add
  %ar-done = f32[64,32]{1,0} all-reduce-done(%ar-start)
  %cp = f32[64,32]{1,0} collective-permute(%a), channel_id=6, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %a2a = f32[64,32]{1,0} all-to-all(%a), channel_id=7, replica_groups={{0,1},{2,3}}, dimensions={0}
}
''')


def test_async_pairs_and_reduce_scatter_fusions_count_once_with_their_link_bytes():
  """An f32[64,32] (8 KiB) per device through each kind of collective on 4 devices; link bytes
  by ring over each op's group."""
  a = 64 * 32 * 4
  c = hlo.collectives(ASYNC_OPS)
  assert c['all-gather'] == {'count': 1, 'bytes': 4 * a, 'link_bytes': 3 / 4 * 4 * a}  # gathered over 4
  # async-start/update/done of a reduce-scatter over 4 (its shard a/4, of a), and the TPU's
  # all-reduce-scatter fusion over groups of 2 (its half a/2, of a): reduce-scatters, not all-reduces
  assert c['reduce-scatter'] == {'count': 2, 'bytes': a // 4 + a // 2, 'link_bytes': 3 / 4 * a + 1 / 2 * a}
  assert c['all-reduce'] == {'count': 1, 'bytes': a, 'link_bytes': 2 * 3 / 4 * a}  # {}: all 4 partitions
  assert c['collective-permute'] == {'count': 1, 'bytes': a, 'link_bytes': a}
  assert c['all-to-all'] == {'count': 1, 'bytes': a, 'link_bytes': 1 / 2 * a}


@pytest.mark.parametrize('groups,size', [
    ('{{0,1},{2,3},{4,5},{6,7}}', 2),
    ('{{0,1,2,3,4,5,6,7}}', 8),
    ('{}', 8),  # every device of the module's 8 partitions
    ('[2,4]<=[8]', 4),
    ('[4,2]<=[2,4]T(1,0)', 2),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 4),
    ("mesh['axis_0'=2,'axis_1'=4,'axis_2'=1] {'axis_0','axis_1'}", 8),
    # a data x fsdp mesh whose devices the mesh orders otherwise (as libtpu 0.0.42 prints it)
    ("mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}", 4),
    ("mesh['axis_0'=2,'axis_1'=1,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_0'}", 2),
])
def test_group_size_in_every_notation(groups, size):
  text = _module(f'''ENTRY %main (a: f32[1024]) -> f32[1024] {{
  %a = f32[1024]{{0}} parameter(0)
  ROOT %sum = f32[1024]{{0}} all-reduce(%a), channel_id=1, replica_groups={groups}, to_apply=%add
}}
''', partitions=8)
  [ar] = hlo.logical_collectives(text)
  assert ar['group'] == size
  assert ar['link_bytes'] == 2 * (size - 1) / size * 4096


def _counted_loop(start: int, bound: int, step: int, direction: str, swap: bool = False, extra: str = '') -> str:
  """A loop of one all-reduce: counter = start; while counter DIRECTION bound: counter += step
  (swap: the condition reads bound DIRECTION' counter)."""
  compare = '%bound, %ctr' if swap else '%ctr, %bound'
  return _module(f'''%lbody (bs: (s32[], f32[8])) -> (s32[], f32[8]) {{
  %bs = (s32[], f32[8]{{0}}) parameter(0)
  %bi = s32[] get-tuple-element(%bs), index=0
  %bv = f32[8]{{0}} get-tuple-element(%bs), index=1
  %summed = f32[8]{{0}} all-reduce(%bv), channel_id=1, replica_groups={{{{0,1,2,3}}}}, to_apply=%add
  %step = s32[] constant({step})
  %moved = s32[] add(%bi, %step)
  ROOT %bo = (s32[], f32[8]{{0}}) tuple(%moved, %summed)
}}

%lcond (cs: (s32[], f32[8])) -> pred[] {{
  %cs = (s32[], f32[8]{{0}}) parameter(0)
  %ctr = s32[] get-tuple-element(%cs), index=0
  %bound = s32[] constant({bound})
  ROOT %go = pred[] compare({compare}), direction={direction}
}}

ENTRY %main (v: f32[8]) -> (s32[], f32[8]) {{
  %v = f32[8]{{0}} parameter(0)
  %first = s32[] constant({start})
  %init = (s32[], f32[8]{{0}}) tuple(%first, %v)
  ROOT %loop = (s32[], f32[8]{{0}}) while(%init), condition=%lcond, body=%lbody{extra}
}}
''')


@pytest.mark.parametrize('start,bound,step,direction,swap,trips', [
    (0, 12, 1, 'LT', False, 12),  # a scan over 12 layers
    (0, 8, 2, 'LT', False, 4),
    (0, 7, 2, 'LT', False, 4),  # 0, 2, 4, 6
    (0, 6, 2, 'LE', False, 4),  # 0, 2, 4, 6
    (10, 0, -3, 'GT', False, 4),  # 10, 7, 4, 1
    (10, 1, -3, 'GE', False, 4),  # 10, 7, 4, 1
    (0, 12, 3, 'NE', False, 4),
    (0, 5, 1, 'GT', True, 5),  # 5 > counter
    (3, 3, 1, 'LT', False, 0),
])
def test_loop_trips_read_from_the_induction_variable(start, bound, step, direction, swap, trips):
  text = _counted_loop(start, bound, step, direction, swap)
  assert hlo.Program(text).loops == [{'while': 'loop', 'body': 'lbody', 'trips': trips, 'read': 'induction variable'}]
  assert hlo.collectives(text)['all-reduce']['count'] == trips


def test_an_unreadable_loop_falls_back_to_xla_trip_count_or_once():
  """A counter that never reaches its bound (0, -1, -2, ... < 8) has no readable trip count:
  XLA's known_trip_count when it gives one, else once, said in the record."""
  known = _counted_loop(0, 8, -1, 'LT', extra=', backend_config={"known_trip_count":{"n":"5"}}')
  assert hlo.Program(known).loops[0]['trips'] == 5 and hlo.Program(known).loops[0]['read'] == 'known_trip_count'
  assert hlo.collectives(known)['all-reduce']['count'] == 5
  unread = hlo.Program(_counted_loop(0, 8, -1, 'LT'))
  assert unread.loops[0]['trips'] == 1 and unread.loops[0]['read'] == 'unread'


def test_tiled_bytes_pad_what_the_layout_tiles():
  """XLA's TPU cost analysis counts arrays as laid out: each dimension a tile covers padded."""
  assert hlo.shape_bytes('f32[4,32]{1,0:T(4,128)}') == 4 * 32 * 4
  assert hlo.shape_bytes('f32[4,32]{1,0:T(4,128)}', tiled=True) == 4 * 128 * 4
  assert hlo.shape_bytes('bf16[4,4,32,30]{2,3,1,0:T(8,128)(2,1)}', tiled=True) == 4 * 4 * 128 * 32 * 2  # dim 2 minor
  assert hlo.shape_bytes('(f32[1000]{0:T(1024)}, s32[]{:T(128)})', tiled=True) == 1024 * 4 + 4
