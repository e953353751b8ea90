"""`vlp compile`: ahead-of-time compilation for TPU topologies on a CPU.

The chip table, the names and the HLO reading need nothing; the tests that compile need
libtpu (the `tpu` extra; CI installs it) and skip, saying so, where it is not installed. The paper-size
configs (blocks scanned) take 4-48 min each on a 2-core machine: they run only with VLP_COMPILE_PAPER=1.
Compiling sets TPU_SKIP_MDS_QUERY=1 (no TPU metadata server to ask) for the rest of the run.
"""
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from vlp.compile import command, hlo, report, target
from vlp.core import chips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_libtpu = pytest.mark.skipif(not target.have_libtpu(),
                                     reason="libtpu not installed: pip install -e '.[tpu]' (jax[tpu]) to compile for TPU")
# 128-wide towers (the TPU's tile) of one block each: the state takes no padding, the compile is short
SMALL = ('model.dtype=bfloat16', 'model.image.depth=1', 'model.text.depth=1', 'model.image.width=128',
         'model.image.mlp_dim=256', 'model.text.width=128', 'model.text.mlp_dim=256', 'model.embed_dim=128')


def _config(path, *overrides):
  from vlp.core import config_files
  return config_files.apply_overrides(config_files.load(os.path.join(ROOT, path)), list(overrides))


# --- names, the chip table, the HLO ----------------------------------------------------------------
@pytest.mark.parametrize('name,chips_,shape,libtpu', [
    ('v5p-256', 128, (4, 4, 8), 'v5p:4x4x8'),  # v5p names count TensorCores: 2 per chip
    ('v4-256', 128, (4, 4, 8), 'v4:4x4x8'),
    ('v4-8', 4, (2, 2, 1), 'v4:2x2x1'),
    ('v4-32', 16, (2, 2, 4), 'v4:2x2x4'),
    ('v5p-128', 64, (4, 4, 4), 'v5p:4x4x4'),
    ('v5e-256', 256, (16, 16), 'v5e:16x16'),  # v5e/v6e names count chips
    ('v5e-4', 4, (2, 2), 'v5e:2x2'),
    ('v6e-64', 64, (8, 8), 'v6e:8x8'),
    ('v5litepod-16', 16, (4, 4), 'v5e:4x4'),
    ('v5e:4x8', 32, (4, 8), 'v5e:4x8'),
    ('v4:4x4x4', 64, (4, 4, 4), 'v4:4x4x4'),
])
def test_topology_names(name, chips_, shape, libtpu):
  t = chips.parse(name)
  assert (t.num_chips, t.shape, t.libtpu_name) == (chips_, shape, libtpu)
  assert t.accelerator_type == chips.parse(t.accelerator_type).accelerator_type


@pytest.mark.parametrize('name,words', [('v5p-3', 'TensorCores'), ('v5e:4x4x4', '2-D'), ('v7-8', 'unknown'),
                                        ('v5e-24', 'power-of-two'), ('tpu', 'expected')])
def test_topology_name_errors(name, words):
  with pytest.raises(ValueError, match=words):
    chips.parse(name)


def test_chip_table_has_sources():
  for chip in chips.CHIPS.values():
    assert chip.hbm_bytes > 8 * 2**30 and chip.peak_flops > 1e14 and chip.hbm_bandwidth > 5e11
    assert chip.source.startswith('Google Cloud TPU docs, "TPU ' + chip.name)


def test_collectives_parsed_from_hlo():
  text = '\n'.join([
      'body.1 (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {',
      '  %ar = f32[8,128]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add',
      '}',
      'ENTRY main.2 (a: f32[8,128]) -> f32[32,128] {',
      '  %ag-start = (f32[8,128]{1,0}, f32[32,128]{1,0}) all-gather-start(%a), dimensions={0}',
      '  %ag-done = f32[32,128]{1,0} all-gather-done(%ag-start)',
      '  %rs = bf16[2,128]{1,0} reduce-scatter(%a), dimensions={0}, to_apply=%add',
      '  %w = (s32[], f32[8,128]) while(%t), condition=%cond, body=%body.1, '
      'backend_config={"known_trip_count":{"n":"4"}}',
      '  ROOT %cp = (f32[8,128], f32[8,128]) collective-permute(%a, %b), source_target_pairs={{0,1}}',
      '}'])
  c = hlo.collectives(text)
  # a module without num_partitions is one device: nothing crosses a link but the permute's buffers
  assert c['all-gather'] == {'count': 1, 'bytes': 32 * 128 * 4, 'link_bytes': 0}  # start and done, once
  assert c['reduce-scatter'] == {'count': 1, 'bytes': 2 * 128 * 2, 'link_bytes': 0}
  assert c['all-reduce'] == {'count': 4, 'bytes': 4 * 8 * 128 * 4, 'link_bytes': 0}  # in a loop of 4 trips
  assert c['collective-permute'] == {'count': 1, 'bytes': 2 * 8 * 128 * 4, 'link_bytes': 2 * 8 * 128 * 4}
  assert c['all-to-all'] == {'count': 0, 'bytes': 0, 'link_bytes': 0}


def test_compile_without_libtpu_is_one_line(monkeypatch, capsys):
  from vlp import cli
  monkeypatch.setattr(target, 'have_libtpu', lambda: False)
  monkeypatch.setenv(target.DUMP_ENV, '')  # this process: no dump folder, XLA_FLAGS left alone
  assert cli.main(['compile', '--config=tests/tiny.py', '--topology=v5e:2x2']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'libtpu' in err[0]


# --- compiling for TPU -------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def small_v5e(tmp_path_factory):
  """The small config compiled for v5e:2x2 (4 chips): (record returned, record on disk, printed)."""
  out, path = io.StringIO(), tmp_path_factory.mktemp('compile') / 'small.json'
  rec = command.run(_config('tests/tiny.py', *SMALL), 'v5e:2x2', json_path=str(path), out=out,
                    config_name='tests/tiny.py')
  return rec, json.loads(path.read_text()), out.getvalue()


@requires_libtpu
def test_small_config_compiles_for_v5e_2x2(small_v5e):
  rec, on_disk, text = small_v5e
  assert on_disk['fits'] is True and rec['fits'] is True
  assert (on_disk['chip'], on_disk['chips'], on_disk['devices'], on_disk['hosts']) == ('v5e', 4, 4, 1)
  assert on_disk['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1, 'expert': 1}
  assert on_disk['hbm_bytes'] == chips.CHIPS['v5e'].hbm_bytes
  assert 0 < on_disk['bytes_per_device'] < on_disk['hbm_bytes']
  assert on_disk['flops_per_step'] > 0 and on_disk['xla_flops_per_device'] > 0
  assert on_disk['bytes_accessed_per_device'] > 0
  assert set(on_disk['collectives']) == set(hlo.COLLECTIVES)
  assert on_disk['collectives']['all-reduce']['count'] > 0  # data parallel: gradients are all-reduced
  # all-reduces over the 4 devices of data=4: twice 3/4 of what they reduce goes over the links
  ar = on_disk['collectives']['all-reduce']
  assert ar['link_bytes'] == pytest.approx(2 * 3 / 4 * ar['bytes'])
  links = sum(c['link_bytes'] for c in on_disk['collectives'].values())
  assert on_disk['link_bytes_per_device'] == pytest.approx(links)
  assert on_disk['ideal_fsdp_bytes_per_device'] == 0 and on_disk['link_to_ideal_fsdp'] is None  # no fsdp axis
  assert on_disk['loops_unread'] == []
  assert 0 < on_disk['mfu_ceiling'] <= 1
  assert [p['name'] for p in on_disk['programs']] == ['train', 'eval/encode_image', 'eval/encode_text']
  train = on_disk['programs'][0]
  assert train['memory']['alias'] > 0  # the state is donated: outputs reuse its buffers
  m = train['memory']
  assert m['total'] == m['argument'] + m['output'] - m['alias'] + m['temp'] + m['generated_code']
  assert 'MFU ceiling' in text and 'memory table printed at training start (an estimate)' in text
  assert 'link bytes per device per step' in text and 'no fsdp axis' in text
  assert text.strip().splitlines()[-1].startswith('fits: yes')


@requires_libtpu
def test_memory_table_state_equals_the_compiled_arguments(small_v5e):
  """The training-start memory table's state rows (params, optimizer state) are what the TPU
  program takes as arguments, less the batch; its activation row is an estimate, and `vlp
  compile` says by how much the whole table is off."""
  rec, _, text = small_v5e
  vs = rec['memory_table_vs_compiled']
  table = rec['memory_table']
  assert vs['table_state'] == table['params'] + table['opt_state']
  assert vs['state_ratio'] == pytest.approx(1.0, abs=0.05), vs
  assert vs['total_ratio'] == pytest.approx(vs['table_total'] / rec['programs'][0]['bytes_per_device'])
  assert vs['total_ratio'] < 1  # the estimate leaves out gradients and the update's temporaries
  assert f'the table is {vs["total_ratio"]:.2f}x the compiled bytes' in text


@requires_libtpu
def test_two_slices_put_data_over_dcn_and_a_smaller_hbm_fails_them():
  """--num_slices=2: the data axis spans two v5e:2x2 slices over DCN. With --hbm_gib set below
  what the step needs, the same program does not fit, and the record names its largest
  buffers (the state's largest leaves here: a process that compiled before has no XLA dump)."""
  rec = command.run(_config('tests/tiny.py', *SMALL), 'v5e:2x2', num_slices=2, evals=False, hbm_bytes=2**20,
                    out=open(os.devnull, 'w'))
  assert (rec['devices'], rec['hosts'], rec['num_slices'], rec['mesh']['data']) == (8, 2, 2, 8)
  assert [p['name'] for p in rec['programs']] == ['train']
  assert rec['collectives']['all-reduce']['count'] + rec['collectives']['reduce-scatter']['count'] > 0
  assert rec['fits'] is False and rec['hbm_bytes'] == 2**20 and rec['not_fitting'] == 'train'
  assert rec['bytes_per_device'] > 2**20 and rec['largest_buffers'][0][2].startswith("state['")
  assert 'needs' in report.not_fit_line(rec)


@requires_libtpu
def test_unknown_variant_is_refused_before_anything_compiles():
  from vlp.core.config import ConfigError
  with pytest.raises(ConfigError, match=r"--variants: \['nope'\] not among \['default'\]"):
    command.run(_config('tests/tiny.py'), 'v5e:2x2', variants='nope', out=open(os.devnull, 'w'))


@requires_libtpu
def test_config_that_does_not_fit_exits_1_naming_its_largest_buffers(tmp_path):
  """A 40M-token vocabulary, replicated (no FSDP), cannot fit 16 GB: the TPU compiler refuses
  it, and `vlp compile` says so in one line naming the largest buffers (from XLA's buffer
  assignment: the embedding table and its Adam moments) and exits 1."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop(target.DUMP_ENV, None)
  out = tmp_path / 'big.json'
  proc = subprocess.run([sys.executable, '-m', 'vlp.cli', 'compile', '--config=tests/tiny.py', '--topology=v5e-4',
                         '--no_eval', f'--json={out}', '--config.model.text.vocab_size=40000000',
                         '--config.model.image.depth=1', '--config.model.text.depth=1'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('vlp compile:')]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert 'does not fit v5e-4' in lines[0] and 'RESOURCE_EXHAUSTED' in lines[0], lines[0]
  assert "argument state['params']['text']['token_embed']" in lines[0], lines[0]
  rec = json.loads(out.read_text())
  assert rec['fits'] is False and rec['not_fitting'] == 'train'
  assert rec['largest_buffers'][0][0] >= 40_000_000 * 32 * 4  # f32[40000000,32]: the table, whole on every chip


def test_not_fit_line_names_the_program_and_its_buffers():
  rec = {'config': 'c.py', 'topology': 'v5e-4', 'hbm_bytes': 16 * 10**9, 'not_fitting': 'train',
         'programs': [{'name': 'train', 'bytes_per_device': 20 * 2**30}],
         'largest_buffers': [(8 * 2**30, 'f32[2,1073741824]', "argument state['params']['w']")]}
  assert report.not_fit_line(rec) == ("c.py does not fit v5e-4 (14.90 GiB HBM per chip): train: needs 20.00 GiB "
                                      "per device; largest buffers: 8.00 GiB f32[2,1073741824] argument "
                                      "state['params']['w']")


# --- the paper-size configs: each compiled for its target topology, and it fits -----------------------
PAPER = [('configs/align_l16.py', 'v5p-256'), ('configs/siglip_b16.py', 'v5e-256'),
         ('configs/albef_base.py', 'v4-32'), ('configs/imp_moe_b.py', 'v5p-256'),
         ('configs/imp_moe_l.py', 'v5p-256')]


@pytest.mark.slow
@requires_libtpu
@pytest.mark.skipif(not os.environ.get('VLP_COMPILE_PAPER'),
                    reason='set VLP_COMPILE_PAPER=1: each paper-size compile takes 4-48 min on a 2-core CPU')
@pytest.mark.parametrize('path,topology', PAPER)
def test_paper_size_config_fits_its_topology(path, topology):
  with open(os.path.join(ROOT, path)) as f:
    assert topology in f.read()  # the docstring names its target
  rec = command.run(_config(path), topology, out=sys.stdout, config_name=path)
  assert rec['fits'], report.not_fit_line(rec)
  assert rec['flops_per_step'] > 0 and rec['mfu_ceiling'] > 0


@pytest.mark.slow
@requires_libtpu
@pytest.mark.skipif(not os.environ.get('VLP_COMPILE_PAPER'),
                    reason='set VLP_COMPILE_PAPER=1 (4 train steps and 3 encoders: about 2 min)')
def test_imp_variants_and_video_encoder_compile():
  rec = command.run(_config('tests/tiny_imp.py'), 'v5e:2x2', out=open(os.devnull, 'w'))
  names = [p['name'] for p in rec['programs']]
  assert {'train/image_text_16px', 'train/image_text_32px', 'train/video_text'} <= set(names)
  assert 'eval/encode_video' in names and rec['fits']


def test_a_scanned_stack_costs_about_what_the_unrolled_one_does():
  """XLA's cost analysis counts a loop body once: with the missed trips added back
  (hlo.loop_trips_cost), a scan over 6 blocks costs what XLA counts for the same 6 blocks
  unrolled (FLOPs: all but the missed trips' elementwise ones; bytes within 10%), blocks
  rematerialised as in the paper-size configs. On the CPU: no collectives, no tiles
  (tests/test_compile_fsdp.py compiles an FSDP stack for TPU)."""
  from flax import nnx

  from vlp.compile import programs
  from vlp.models import layers

  def compiled(scan):
    graphdef, state = nnx.split(layers.Encoder(64, 6, 4, 256, rngs=nnx.Rngs(0), scan=scan, remat='full'))
    loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2)
    return jax.jit(jax.grad(loss)).lower(state, jnp.ones((8, 16, 64))).compile()

  unrolled, scanned = compiled(False), compiled(True)
  want, got = (programs.cost(c, c.as_text()) for c in (unrolled, scanned))
  assert scanned.cost_analysis()['flops'] < 0.3 * want['flops']  # what the correction is for
  assert 0.85 < got['flops'] / want['flops'] <= 1.0
  assert 0.9 < got['bytes_accessed'] / want['bytes_accessed'] < 1.1
