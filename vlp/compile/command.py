"""`vlp compile`: everything compiled for one topology, the report printed, the record written."""
import dataclasses
import json
import os
import sys

from vlp import plan as plan_lib
from vlp.compile import programs as programs_lib, report, target
from vlp.core import chips, compiler_flags, parallel
from vlp.core.config import ConfigError
from vlp.train import state as state_lib


def _chosen(plan, variants: str) -> list:
  wanted = [n for n in variants.split(',') if n]
  unknown = sorted(set(wanted) - {v.name for v in plan.variants})
  if unknown:
    raise ConfigError(f'--variants: {unknown} not among {[v.name for v in plan.variants]}')
  return [v for v in plan.variants if not wanted or v.name in wanted]


def _topology(topology: str, hbm_bytes: int | None) -> chips.Topology:
  try:
    topo = chips.parse(topology)
  except ValueError as e:
    raise ConfigError(f'--topology: {e}') from None
  if hbm_bytes is None:
    return topo
  return dataclasses.replace(topo, chip=dataclasses.replace(topo.chip, hbm_bytes=int(hbm_bytes)))


def _compile_all(plan, setup, variants, evals: bool, chip, num_devices: int, p) -> list:
  out = []
  for v in variants:
    out.append(programs_lib.train_step(plan, setup, v, chip, num_devices))
    report.progress(p, out[-1], chip)
  for name, jitted, args in programs_lib.eval_encoders(plan, setup) if evals else []:
    out.append(programs_lib.eval_encoder(name, jitted, args, chip, num_devices))
    report.progress(p, out[-1], chip)
  return out


def _table_vs_compiled(plan, setup, programs) -> tuple[dict, dict]:
  """The training-start memory table, and how it compares with the largest compiled train step."""
  table = parallel.memory_table(setup.abstract, plan.activation_bytes())
  train = [e for e in programs if e['kind'] == 'train' and 'memory' in e]
  if not train:
    return table, report.table_vs_compiled(table, None, 0)
  entry = max(train, key=lambda e: e['memory']['total'])
  batch = parallel.bytes_per_device(plan.batch_spec(plan.variant(entry['variant']), setup.mesh))
  return table, report.table_vs_compiled(table, entry, batch)


def _compiler_flags(config, p) -> dict:
  """The TPU compiler flags of the config (vlp.core.compiler_flags), and whether libtpu got them:
  `vlp compile` sets them before libtpu starts; a process where it started before (a test run)
  compiles with the flags it started with."""
  chosen, defaults = compiler_flags.flags(config, 'tpu'), compiler_flags.defaults(config, 'tpu')
  given = os.environ.get('LIBTPU_INIT_ARGS', '')
  missing = [f for f in chosen if f not in given.split()]
  p(f'compiler flags (config.compiler, in LIBTPU_INIT_ARGS; {len(set(chosen) & set(defaults))} of them vlp\'s '
    f'defaults for this mesh): {" ".join(chosen) or "none"}'
    + (f'; NOT in effect: {" ".join(missing)} (libtpu started before they were set)' if missing else ''))
  return {'platform': 'tpu', 'variable': 'LIBTPU_INIT_ARGS', 'flags': list(chosen), 'defaults': list(defaults),
          'libtpu_init_args': given, 'not_in_effect': missing}


def run(config, topology: str, num_slices: int = 1, json_path: str | None = None, out=None,
        config_name: str = '', variants: str = '', evals: bool = True, hbm_bytes: int | None = None) -> dict:
  """Compiles the config's programs for the topology, prints the report, writes the JSON
  record (json_path) and returns it.

  variants: comma-separated variant names to compile ('' for all); evals=False leaves the
  eval encoders out; hbm_bytes: the HBM per chip to check against (default: the chip table's)."""
  out = out or sys.stdout
  p = lambda *a: print(*a, file=out, flush=True)
  topo = _topology(topology, hbm_bytes)
  if num_slices < 1:
    raise ConfigError('--num_slices must be >= 1')
  devices = target.topology_devices(topo, num_slices)
  processes = len({d.process_index for d in devices})
  plan = plan_lib.make(config, len(devices), processes)  # ConfigError names the key
  mesh = target.make_mesh(plan.sizes, devices, num_slices)
  setup = state_lib.make_setup(plan, mesh)
  chosen = _chosen(plan, variants)
  report.header(p, config_name, topo, num_slices, len(devices), processes, plan.sizes)
  flags = _compiler_flags(config, p)
  programs = _compile_all(plan, setup, chosen, evals, topo.chip, len(devices), p)
  report.memory_lines(p, programs, topo.chip)
  report.step_lines(p, programs)
  table, vs = _table_vs_compiled(plan, setup, programs)
  report.table_lines(p, table, vs, topo.chip)
  rec = report.record(config_name, topo, num_slices, len(devices), processes, plan.sizes, programs, table, vs)
  rec['variants_compiled'] = [v.name for v in chosen]
  rec['compiler'] = flags
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(rec, f, indent=1, default=float)  # numpy scalars
  p(f'fits: {"yes" if rec["fits"] else "NO, " + rec["not_fitting"]} (largest compiled program '
    f'{report.gib(rec["bytes_per_device"])} of {report.gib(topo.chip.hbm_bytes)} HBM)'
    + (f'; record: {json_path}' if json_path else ''))
  return rec


def main(config, topology, num_slices=1, json_path=None, config_name='', variants='', evals=True,
         hbm_bytes=None) -> int:
  """The CLI's body: 0 when everything fits, 1 when not (one line on stderr)."""
  if not target.have_libtpu():
    raise ConfigError("vlp compile needs libtpu to compile for TPU: pip install -e '.[tpu]' (or '.[test]')")
  try:
    rec = run(config, topology, num_slices, json_path, config_name=config_name, variants=variants,
              evals=evals, hbm_bytes=hbm_bytes)
  finally:
    target.cleanup_dump()
  if not rec['fits']:
    print(f'vlp compile: {report.not_fit_line(rec)}', file=sys.stderr)
    return 1
  return 0
