"""`vlp train|eval|export|bench|data` — the command line.

Config overrides are passed as `--config.a.b=value` after the other flags.
"""
import argparse
import json
import sys


def _split_overrides(argv):
  overrides = [a[len('--config.'):] for a in argv if a.startswith('--config.')]
  rest = [a for a in argv if not a.startswith('--config.')]
  return rest, overrides


def _load_config(spec: str, overrides):
  from vlp import config as config_lib
  path, _, arg = spec.partition(':')
  config = config_lib.load(path, arg or None)
  return config_lib.apply_overrides(config, overrides)


def cmd_train(args, overrides):
  from vlp import distributed
  # Before anything touches a device: joins the process group of a multi-host run.
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  import jax
  from vlp.train import loop
  config = _load_config(args.config, overrides)
  result = loop.train(config, args.workdir, progress=not args.no_progress, step=args.step)
  if jax.process_index() == 0:
    _print_result(result)


def cmd_eval(args, overrides):
  import jax
  from vlp import parallel, tasks, config as config_lib
  from vlp.export import restore_params
  from vlp.train import loop, state as state_lib
  config, params, step = restore_params(args.workdir, args.step)
  if args.config:
    config = _load_config(args.config, overrides)
  mesh = parallel.make_mesh(config_lib.mesh_shape(config, jax.device_count()))
  setup = state_lib.make_setup(config, mesh)
  evaluator = loop.make_evaluator(config, setup, tasks.tokenizer_for(config))
  if evaluator is None:
    raise config_lib.ConfigError("config key 'data.eval': no held-out data to evaluate on")
  result = dict(evaluator.run(params))
  result['step'] = step
  _print_result(result)


def _print_result(result):
  from vlp.eval import retrieval
  for prefix in ('retrieval/', 'retrieval_itm/'):  # ALBEF adds ITM re-ranking
    metrics = {k.removeprefix(prefix): v for k, v in result.items() if k.startswith(prefix)}
    if metrics:
      print(f'{prefix[:-1]}:\n' + retrieval.format_table(metrics))
  print(json.dumps(result, default=float))


def cmd_export(args, overrides):
  from vlp import export
  out = export.export(args.workdir, args.out, step=args.step, dtype=args.dtype)
  print(f'exported to {out}')


def cmd_bench_data(args, overrides):
  from vlp.bench import data
  data.main(args.rest)


def cmd_bench(args, overrides):
  from vlp.bench import step as bench_step
  config = _load_config(args.config, overrides)
  if args.what == 'matmuls':
    from vlp.bench import matmuls
    print(json.dumps(matmuls.run(config)))
    return
  result = bench_step.run(config, steps=args.steps, warmup=args.warmup)
  if args.compare == 'open_clip':
    from vlp.bench import compare
    ref = compare.run_open_clip_reference(config.model, config.batch_size, steps=args.steps, warmup=args.warmup)
    result['vs_open_clip'] = compare.side_by_side(
        result, ref, result['model_tflops_per_step'] * 1e12, result['peak_tflops'] * 1e12)
  print(json.dumps(result))


def cmd_data(args, overrides):
  if args.tool == 'tokenizer':
    from vlp.data import tokenizer
    tokenizer.main(args.rest)
  else:
    from vlp.data import convert
    {'convert': convert.main_convert, 'check': convert.main_check}[args.tool](args.rest)


def main(argv=None):
  from vlp.config import ConfigError
  from vlp.checkpoint import WorkdirMismatch
  argv = sys.argv[1:] if argv is None else argv
  argv, overrides = _split_overrides(argv)
  parser = argparse.ArgumentParser(prog='vlp', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('train', help='train or resume in a workdir')
  p.add_argument('--config', required=True, help='configs/X.py[:arg]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--no_progress', action='store_true')
  p.add_argument('--step', type=int, default=None,
                 help='resume this saved step instead of the latest; deletes the later checkpoints')
  p.add_argument('--coordinator', default=None, help='host:port of process 0 (multi-process; or VLP_COORDINATOR)')
  p.add_argument('--num_processes', type=int, default=None, help='or VLP_NUM_PROCESSES')
  p.add_argument('--process_id', type=int, default=None, help='or VLP_PROCESS_ID')
  p.set_defaults(fn=cmd_train)
  p = sub.add_parser('eval', help='held-out retrieval of a workdir checkpoint')
  p.add_argument('--workdir', required=True)
  p.add_argument('--config', default=None, help='optional: evaluate with another config')
  p.add_argument('--step', type=int, default=None)
  p.set_defaults(fn=cmd_eval)
  p = sub.add_parser('export', help='write inference weights (safetensors) + config')
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--step', type=int, default=None)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.set_defaults(fn=cmd_export)
  bench = sub.add_parser('bench', help='benchmarks: step, matmuls, data').add_subparsers(dest='what', required=True)
  for what, help_ in (('step', 'examples/s, step time, MFU of the train step'),
                      ('matmuls', "the step's matmul-only floor")):
    p = bench.add_parser(what, help=help_)
    p.add_argument('--config', required=True)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--compare', default=None, choices=('open_clip',))
    p.set_defaults(fn=cmd_bench)
  p = bench.add_parser('data', help='images/s of the input pipeline (flags: vlp bench data -h)', add_help=False)
  p.set_defaults(fn=cmd_bench_data)  # its flags are parsed by vlp.bench.data
  p = sub.add_parser('data', help='data tools: `vlp data tokenizer|convert|check ...` (-h after the tool for its flags)')
  p.add_argument('tool', choices=('tokenizer', 'convert', 'check'))
  p.add_argument('rest', nargs=argparse.REMAINDER)
  p.set_defaults(fn=cmd_data)
  args, rest = parser.parse_known_args(argv)
  if args.fn is cmd_bench_data:
    args.rest = rest
  elif rest:
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  if overrides and args.command not in ('train', 'eval', 'bench'):
    parser.error(f'--config.* overrides do not apply to `vlp {args.command}`')
  # Data tools report bad paths and inputs as ValueError: one line, no traceback.
  user_errors = (ConfigError, WorkdirMismatch, FileNotFoundError) + ((ValueError,) if args.command == 'data' else ())
  try:
    args.fn(args, overrides)
  except user_errors as e:
    print(f'vlp: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
