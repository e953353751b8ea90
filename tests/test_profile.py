"""Profiling: `vlp bench step --profile` (its op categories, the trace it reads, open_clip's side),
`config.profile.steps` in training, configs/clip_b16.py and the GPU peak table."""
import glob
import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from vlp import cli, plan as plan_lib
from vlp.bench import categories, compare, op_profile, peak
from vlp.core import config_files
from vlp.core.config import ConfigError
from vlp.train import profile as train_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny.py')

# One instruction of each kind, as XLA prints them (op_names as jax writes them: named scopes, the
# backward pass under transpose(jvp(...))).
HLO = '''HloModule jit_train_step, is_scheduled=true

%region_0 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%a, %b)
}

%fused_dot (p0: f32[8,16], p1: f32[16,32]) -> f32[8,32] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/jvp(loss)/bld,dthk->tblhk/dot_general"}
}

%fused_scores (p0.1: f32[2,4,8], p1.1: f32[2,4,8]) -> f32[2,4,4] {
  %p0.1 = f32[2,4,8]{2,1,0} parameter(0)
  %p1.1 = f32[2,4,8]{2,1,0} parameter(1)
  ROOT %dot.2 = f32[2,4,4]{2,1,0} dot(%p0.1, %p1.1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}, metadata={op_name="jit(train_step)/transpose(jvp(loss))/attention/bqhk,bshk->bhqs/dot_general"}
}

%fused_softmax (p0.2: f32[2,4,4]) -> f32[2,4,4] {
  %p0.2 = f32[2,4,4]{2,1,0} parameter(0)
  ROOT %exp.1 = f32[2,4,4]{2,1,0} exponential(%p0.2), metadata={op_name="jit(train_step)/jvp(loss)/attention/exp"}
}

%fused_ln (p0.3: f32[8,32], p1.3: f32[8]) -> f32[8,32] {
  %p0.3 = f32[8,32]{1,0} parameter(0)
  %p1.3 = f32[8]{0} parameter(1)
  %rsqrt.1 = f32[8]{0} rsqrt(%p1.3), metadata={op_name="jit(train_step)/jvp(loss)/layer_norm/rsqrt"}
  %bc.1 = f32[8,32]{1,0} broadcast(%rsqrt.1), dimensions={0}
  ROOT %mul.1 = f32[8,32]{1,0} multiply(%p0.3, %bc.1), metadata={op_name="jit(train_step)/jvp(loss)/layer_norm/mul"}
}

%fused_norm_unscoped (p0.4: f32[8,32]) -> f32[8] {
  %p0.4 = f32[8,32]{1,0} parameter(0)
  %c.4 = f32[] constant(0)
  %sum.4 = f32[8]{0} reduce(%p0.4, %c.4), dimensions={1}, to_apply=%region_0
  ROOT %rsqrt.4 = f32[8]{0} rsqrt(%sum.4)
}

%fused_gelu (p0.5: f32[8,32]) -> f32[8,32] {
  %p0.5 = f32[8,32]{1,0} parameter(0)
  %tanh.5 = f32[8,32]{1,0} tanh(%p0.5), metadata={op_name="jit(train_step)/jvp(loss)/tanh"}
  ROOT %mul.5 = f32[8,32]{1,0} multiply(%p0.5, %tanh.5), metadata={op_name="jit(train_step)/jvp(loss)/mul"}
}

%fused_transpose (p0.6: f32[8,32]) -> f32[32,8] {
  %p0.6 = f32[8,32]{1,0} parameter(0)
  ROOT %transpose.6 = f32[32,8]{1,0} transpose(%p0.6), dimensions={1,0}
}

%fused_adam (p0.7: f32[8,32], p1.7: f32[8,32]) -> f32[8,32] {
  %p0.7 = f32[8,32]{1,0} parameter(0)
  %p1.7 = f32[8,32]{1,0} parameter(1)
  %sqrt.7 = f32[8,32]{1,0} sqrt(%p1.7), metadata={op_name="jit(train_step)/optimizer/sqrt"}
  ROOT %div.7 = f32[8,32]{1,0} divide(%p0.7, %sqrt.7), metadata={op_name="jit(train_step)/optimizer/div"}
}

%fused_bias_grad (p0.8: f32[8,32]) -> f32[32] {
  %p0.8 = f32[8,32]{1,0} parameter(0)
  %c.8 = f32[] constant(0)
  ROOT %sum.8 = f32[32]{0} reduce(%p0.8, %c.8), dimensions={0}, to_apply=%region_0, metadata={op_name="jit(train_step)/transpose(jvp(loss))/reduce_sum"}
}

ENTRY %main (x: f32[8,16], w: f32[16,32], q: f32[2,4,8]) -> f32[32] {
  %x = f32[8,16]{1,0} parameter(0)
  %w = f32[16,32]{1,0} parameter(1)
  %q = f32[2,4,8]{2,1,0} parameter(2)
  %dot_fusion = f32[8,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %scores_fusion = f32[2,4,4]{2,1,0} fusion(%q, %q), kind=kCustom, calls=%fused_scores
  %softmax_fusion = f32[2,4,4]{2,1,0} fusion(%scores_fusion), kind=kLoop, calls=%fused_softmax
  %norm_fusion = f32[8]{0} fusion(%dot_fusion), kind=kLoop, calls=%fused_norm_unscoped
  %ln_fusion = f32[8,32]{1,0} fusion(%dot_fusion, %norm_fusion), kind=kLoop, calls=%fused_ln
  %gelu_fusion = f32[8,32]{1,0} fusion(%ln_fusion), kind=kLoop, calls=%fused_gelu
  %transpose_fusion = f32[32,8]{1,0} fusion(%gelu_fusion), kind=kLoop, calls=%fused_transpose
  %copy.3 = f32[8,32]{0,1} copy(%gelu_fusion)
  %all-reduce.1 = f32[8,32]{1,0} all-reduce(%gelu_fusion), replica_groups={}, to_apply=%region_0
  %cublas-gemm.1 = (f32[8,32]{1,0}, s8[4]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm"
  %adam_fusion = f32[8,32]{1,0} fusion(%all-reduce.1, %gelu_fusion), kind=kLoop, calls=%fused_adam
  ROOT %bias_fusion = f32[32]{0} fusion(%adam_fusion), kind=kLoop, calls=%fused_bias_grad
}
'''

WANT = {'dot_fusion': 'matmul', 'scores_fusion': 'attention', 'softmax_fusion': 'attention',
        'norm_fusion': 'normalisation', 'ln_fusion': 'normalisation', 'gelu_fusion': 'elementwise',
        'transpose_fusion': 'copy/transpose', 'copy.3': 'copy/transpose', 'all-reduce.1': 'collective',
        'cublas-gemm.1': 'matmul', 'adam_fusion': 'optimizer', 'bias_fusion': 'other'}


def test_op_categories_of_hand_written_hlo():
  module, cats = categories.classify(HLO)
  assert module == 'jit_train_step'
  assert {name: cats[name] for name in WANT} == WANT
  assert categories.scopes('jit(f)/transpose(jvp(loss))/attention/bqhk,bshk->bhqs/dot_general') >= {
      'f', 'loss', 'attention', 'dot_general'}
  # the instructions' own parts
  assert categories.category([('all-gather-start', '', '')]) == 'collective'
  assert categories.category([('custom-call', '', '__cudnn$fmhaSoftmax')]) == 'attention'
  assert categories.category([('while', '', '')]) == 'other'
  assert categories.category([('convert', '', ''), ('add', '', '')]) == 'elementwise'


def test_torch_operator_categories():
  cases = {('aten::addmm', ''): 'matmul', ('aten::mm', ''): 'matmul', ('aten::bmm', 'attention'): 'attention',
           ('aten::_scaled_dot_product_flash_attention_for_cpu', ''): 'attention',
           ('aten::_efficient_attention_backward', ''): 'attention', ('aten::_softmax', ''): 'attention',
           ('aten::_log_softmax', ''): 'other', ('aten::_log_softmax_backward_data', ''): 'other',
           ('aten::native_layer_norm_backward', ''): 'normalisation', ('aten::gelu', ''): 'elementwise',
           ('aten::add_', ''): 'elementwise', ('aten::mul', ''): 'elementwise',
           ('aten::_foreach_mul_', 'optimizer'): 'optimizer', ('aten::lerp_', 'optimizer'): 'optimizer',
           ('aten::copy_', ''): 'copy/transpose', ('aten::t', ''): 'copy/transpose',
           ('aten::clone', ''): 'copy/transpose', ('aten::embedding_dense_backward', ''): 'other',
           ('nccl:all_reduce', ''): 'collective'}
  assert {k: categories.torch_category(*k) for k in cases} == cases


def _event(pid, tid, ts, dur, op, device='0'):
  return {'ph': 'X', 'pid': pid, 'tid': tid, 'ts': ts, 'dur': dur, 'name': op,
          'args': {'hlo_op': op, 'hlo_module': 'jit_train_step', 'device_ordinal': device}}


def test_trace_self_times_and_table(tmp_path):
  events = [_event(1, 7, 0, 100, 'dot_fusion'), _event(1, 7, 100, 50, 'while.1'),
            _event(1, 7, 110, 30, 'gelu_fusion'),  # inside the while loop: taken off its time
            _event(1, 8, 0, 40, 'adam_fusion', device='1'), _event(1, 8, 40, 10, 'unknown.9', device='1')]
  times, devices = op_profile.self_times(events)
  assert times == {'dot_fusion': 100, 'while.1': 20, 'gelu_fusion': 30, 'adam_fusion': 40, 'unknown.9': 10}
  assert devices == 2
  names = [{'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
           {'ph': 'M', 'pid': 2, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}}]
  gpu = _event(2, 1, 0, 5, 'dot_fusion')
  assert op_profile.instruction_events({'traceEvents': names + events + [gpu]}) == [gpu]  # the device's, not the host's
  run = tmp_path / 'plugins' / 'profile' / 'run1'
  run.mkdir(parents=True)
  with gzip.open(run / 'host.trace.json.gz', 'wt') as f:
    host = {'ph': 'X', 'pid': 1, 'tid': 7, 'ts': 0, 'dur': 500, 'name': 'ThunkExecutor::Execute'}  # not an op
    json.dump({'traceEvents': names[:1] + [host] + events}, f)
  b = op_profile.breakdown(str(tmp_path), HLO, steps=2)
  assert b['devices'] == 2 and b['unlisted'] == ['unknown.9', 'while.1']
  assert b['ms_per_step'] == pytest.approx({'matmul': 0.025, 'attention': 0, 'normalisation': 0, 'elementwise': 0.0075,
                                            'optimizer': 0.01, 'copy/transpose': 0, 'collective': 0, 'other': 0.0075})
  table = op_profile.format_table({'vlp': b, 'open_clip': {'ms_per_step': dict(b['ms_per_step'], matmul=0.1)}})
  lines = table.splitlines()
  assert lines[0].split() == ['category', 'vlp', 'ms', 'share', 'open_clip', 'ms', 'share']
  assert lines[1].split() == ['matmul', '0.03', '50.0%', '0.10', '80.0%']
  assert lines[-1].split() == ['total', '0.05', '100.0%', '0.12', '100.0%']


def test_a_real_trace_of_a_jitted_step(tmp_path):
  """jax.profiler's own trace of a small program with the scopes the step and the models use."""
  @jax.jit
  def step(w, x):
    with jax.named_scope('loss'):
      with jax.named_scope('attention'):
        y = jax.nn.softmax(x @ w, axis=-1)
      with jax.named_scope('layer_norm'):  # of x, not y: a fusion of its own
        z = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
      loss = y.sum() + z.sum()
    with jax.named_scope('optimizer'):
      return w - 0.1 * jnp.sqrt(jnp.abs(w)) * loss
  w, x = jnp.ones((128, 128)), jnp.ones((64, 128))
  compiled = step.lower(w, x).compile()
  compiled(w, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      compiled(w, x).block_until_ready()
  assert glob.glob(str(tmp_path / 'plugins' / 'profile' / '*' / '*.xplane.pb'))  # what TensorBoard reads
  b = op_profile.breakdown(str(tmp_path), compiled.as_text(), steps=2)
  assert b['unlisted'] == [] and b['devices'] == 1
  ms = b['ms_per_step']
  assert ms['attention'] > 0 and ms['normalisation'] > 0 and ms['optimizer'] > 0 and sum(ms.values()) > 0


@pytest.mark.slow
def test_bench_step_profile_prints_the_categories(tmp_path, capsys):
  out = tmp_path / 'prof'
  assert cli.main(['bench', 'step', f'--config={TINY}', '--steps=2', '--warmup=1', f'--profile={out}']) == 0
  text = capsys.readouterr().out
  result = json.loads(text.strip().splitlines()[-1])
  assert f'profile: {out}' in text and 'device time per step by op category' in text
  for cat in categories.CATEGORIES:
    assert any(line.startswith(cat + ' ') for line in text.splitlines()), cat
  b = result['profile']
  assert b['devices'] == 8 and b['steps'] == 2 and b['unlisted'] == []
  assert glob.glob(str(out / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  for cat in ('matmul', 'attention', 'normalisation', 'optimizer', 'collective'):  # 8 devices: gradient all-reduces
    assert b['ms_per_step'][cat] > 0, cat


def _bench_python():
  try:
    return compare.bench_python(None)
  except compare.ReferenceEnvError as e:
    pytest.skip(str(e))


@pytest.mark.slow
def test_bench_step_profile_with_open_clip_beside(tmp_path, capsys):
  _bench_python()
  assert cli.main(['bench', 'step', f'--config={TINY}', '--steps=2', '--warmup=1', '--compare=open_clip',
                   f'--profile={tmp_path}']) == 0
  text = capsys.readouterr().out
  result = json.loads(text.strip().splitlines()[-1])
  assert 'open_clip self CPU time' in text and 'vlp / open_clip' in text
  theirs = result['open_clip_profile']['ms_per_step']
  for cat in ('matmul', 'attention', 'normalisation', 'elementwise', 'optimizer', 'copy/transpose'):
    assert theirs[cat] > 0, cat


def test_open_clip_reference_profile_and_bf16_autocast_on_cpu():
  """The reference's new paths that run without a GPU: --profile and a bf16 config under autocast."""
  python = _bench_python()
  model = tiny_config().model.copy_and_resolve_references()
  model.dtype = 'bfloat16'
  ref = compare.run_open_clip_reference(model, 8, steps=1, warmup=1, python=python, threads=1, profile=True,
                                        extra_args=('--no-peak',))
  assert ref['amp'] == 'bf16' and ref['device'] == 'cpu' and ref['peak_memory_gib'] is None
  ops = ref['profile']['ops']
  assert {scope for _, scope, _, _ in ops} == {'', 'optimizer', 'attention'}
  got = op_profile.torch_breakdown(ref['profile'])['ms_per_step']
  assert got['matmul'] > 0 and got['optimizer'] > 0 and got['attention'] > 0


def test_side_by_side_table_with_peak_memory():
  row = compare.side_by_side(dict(examples_per_sec=120.0, step_ms=1000.0, peak_memory_gib=30.5),
                             dict(examples_per_sec=100.0, step_ms=1200.0, peak_memory_gib=20.25),
                             train_flops_per_step=1e9, jax_peak_flops=2e9)
  lines = compare.format_side_by_side(row).splitlines()
  assert lines[1].split() == ['vlp', '120.0', '1000.0', '0.500', '30.5']
  assert lines[2].split() == ['open_clip', '100.0', '1200.0', '0.417', '20.2']
  assert lines[3] == 'vlp / open_clip: 1.20x (goal 1.2x)'


def test_gpu_peak_table():
  assert peak.datasheet_peak('NVIDIA H100 80GB HBM3')[0] == 989e12
  assert peak.datasheet_peak('NVIDIA H200')[0] == 989e12
  assert peak.datasheet_peak('NVIDIA H100 PCIe')[0] == 756e12
  assert peak.datasheet_peak('NVIDIA A100-SXM4-80GB')[0] == 312e12
  assert peak.datasheet_peak('cpu') is None


def test_step_trace_starts_and_stops_around_the_steps(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(jax.profiler, 'start_trace', lambda d: calls.append(('start', d)))
  monkeypatch.setattr(jax.profiler, 'stop_trace', lambda: calls.append(('stop',)))
  trace = train_profile.StepTrace((1, 3), str(tmp_path), log=lambda *a: None)
  for done in range(4):  # the loop: before(done) ... dispatch ... after(done + 1)
    trace.before(done, {'x': jnp.ones(2)})
    calls.append(done + 1)
    trace.after(done + 1, {'x': jnp.ones(2)})
  trace.stop()
  assert calls == [1, ('start', str(tmp_path / 'profile')), 2, 3, ('stop',), 4]
  calls.clear()
  resumed = train_profile.StepTrace((1, 3), str(tmp_path), log=lambda *a: None)
  resumed.before(2)  # a run resumed inside the range traces from its first step
  resumed.stop()  # and a run that ends inside it stops the trace at its end
  assert calls == [('start', str(tmp_path / 'profile')), ('stop',)]
  calls.clear()
  off = train_profile.StepTrace((), str(tmp_path))
  off.before(0), off.after(1, None), off.stop()
  assert calls == []


@pytest.mark.parametrize('steps', [(3, 1), (2, 2), (-1, 2), (1,), (1, 2, 3), (1.0, 2), (True, 2)])
def test_bad_profile_steps_name_the_key(steps):
  c = tiny_config(**{'profile.steps': steps})
  with pytest.raises(ConfigError, match="'profile.steps'"):
    plan_lib.validate(c, num_devices=8)


def test_profile_steps_override():
  c = config_files.apply_overrides(tiny_config(), ['profile.steps=(1, 3)'])
  assert c.profile.steps == (1, 3) and plan_lib.validate(c, num_devices=8)
  assert tiny_config().profile.steps == ()


@pytest.mark.slow
def test_train_writes_a_trace_of_the_profiled_steps(tmp_path, capsys):
  """A 4-step run with profile.steps=(1, 3): a trace of steps 2..3 in WORKDIR/profile."""
  from vlp.train import loop
  workdir = tmp_path / 'run'
  c = tiny_config(total_steps=4, **{'profile.steps': (1, 3)})
  del c.evals['retrieval']
  loop.train(c, str(workdir), progress=False)
  assert f'profiling steps 2..3 into {workdir}/profile' in capsys.readouterr().out
  assert glob.glob(str(workdir / 'profile' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))  # TensorBoard's
  traces = glob.glob(str(workdir / 'profile' / 'plugins' / 'profile' / '*' / '*.trace.json.gz'))
  with gzip.open(traces[0], 'rt') as f:
    runs = {e['args']['run_id'] for e in json.load(f)['traceEvents']
            if e.get('ph') == 'X' and e.get('args', {}).get('hlo_module') == 'jit_train_step'}
  assert len(runs) == 2  # steps 2 and 3 (each on the 8 simulated devices), not 1 or 4


def test_clip_b16_config_is_clip_vit_b16_and_validates():
  c = config_files.load(os.path.join(ROOT, 'configs', 'clip_b16.py'))
  plan = plan_lib.make(c, 1)
  assert plan.sizes == {'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}
  im, tx = c.model.image, c.model.text
  assert (im.image_size, im.patch_size, im.width, im.depth, im.num_heads, im.mlp_dim, im.pool) == (
      224, 16, 768, 12, 12, 3072, 'cls')
  assert (tx.vocab_size, tx.context_length, tx.width, tx.depth, tx.num_heads, tx.mlp_dim, tx.causal, tx.pool) == (
      49408, 77, 512, 12, 8, 2048, True, 'eos')
  assert (c.model.embed_dim, c.model.dtype, c.model.param_dtype, c.batch_size) == (512, 'bfloat16', 'float32', 256)
  eight = config_files.load(os.path.join(ROOT, 'configs', 'clip_b16.py'), '8')
  assert eight.batch_size == 2048 and plan_lib.make(eight, 8).variants[0].batch_size == 2048
  json.loads(compare.model_cfg_json(c.model))  # what the open_clip reference is given
