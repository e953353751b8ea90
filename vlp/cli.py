"""`vlp train|eval|plot|export|import|bench|compile|data` — the command line.

Config overrides are passed as `--config.a.b=value` after the other flags.
"""
import argparse
import json
import os
import sys


def _split_overrides(argv):
  overrides = [a[len('--config.'):] for a in argv if a.startswith('--config.')]
  rest = [a for a in argv if not a.startswith('--config.')]
  return rest, overrides


def _load_config(spec: str, overrides):
  from vlp.core import config_files
  path, _, arg = spec.partition(':')
  config = config_files.load(path, arg or None)
  return config_files.apply_overrides(config, overrides)


def _set_compiler_flags(config, target=None):
  """Before anything touches a device: the config's compiler flags (vlp.core.compiler_flags)."""
  from vlp.core import compiler_flags
  return compiler_flags.apply(config, target)


def _join(args):
  """Before anything touches a device: joins the process group of a multi-host run."""
  from vlp.core import distributed
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def cmd_train(args, overrides):
  config = _load_config(args.config, overrides)
  _set_compiler_flags(config)
  _join(args)
  import jax
  from vlp.train import loop
  result = loop.train(config, args.workdir, progress=not args.no_progress, step=args.step)
  if jax.process_index() == 0:
    _print_result(result)


def cmd_eval(args, overrides):
  from vlp.workdir import identity
  _set_compiler_flags(_load_config(args.config, overrides) if args.config else identity.load_config(args.workdir))
  _join(args)
  import jax
  from flax import nnx
  from vlp import eval as eval_lib, plan as plan_lib
  from vlp.core import config as config_lib, parallel, paths
  from vlp.data import tokenizer as tokenizer_lib
  from vlp.models import stacks
  from vlp.workdir import checkpoints, layout
  config, params, step = checkpoints.restore_params(args.workdir, args.step, args.weights)
  if args.config:
    config = _load_config(args.config, overrides)
  plan = plan_lib.make(config, jax.device_count(), jax.process_count())  # checked before anything compiles
  if args.config:  # the params as the given config's model stores them (its model.scan_layers may not be the workdir's)
    params = stacks.to_layout(params, plan.params(parallel.make_mesh(plan.sizes)).abstract)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: plan.recipe.build(config.model)), nnx.Param)
  evaluators = eval_lib.make(config, plan.recipe.predict_fns(graphdef), tokenizer_lib.for_config(config))
  if not evaluators:
    raise config_lib.ConfigError("config key 'evals': no evaluator has data to evaluate on")
  metrics = eval_lib.run(evaluators, params)  # every process takes part; process 0 reports
  if jax.process_index() != 0:
    return
  print(eval_lib.format_tables(evaluators, metrics))
  model = f'{paths.abspath(args.workdir)}@{step}' + ('/ema' if args.weights == 'ema' else '')
  records = eval_lib.records(evaluators, metrics, config, model, step)
  out = args.json or layout.eval_results(args.workdir, step)
  with paths.open(out, 'w') as f:
    json.dump(records, f, indent=2, default=float)
  for r in records:
    print(json.dumps(r, default=float))
  print(f'results: {out}')
  if args.plot:
    cmd_plot(args, overrides)


def cmd_import(args, overrides):
  from vlp.interop import command
  out = command.run(args.src, args.out, args.format, args.dtype, args.tokenizer, args.allow_pickle)
  print(f'imported: {out}')


def _add_process_group(p):
  """A multi-process job's flags: each process of `vlp train/eval/export` runs with its own."""
  p.add_argument('--coordinator', default=None, help='host:port of process 0 (multi-process; or VLP_COORDINATOR)')
  p.add_argument('--num_processes', type=int, default=None, help='or VLP_NUM_PROCESSES')
  p.add_argument('--process_id', type=int, default=None, help='or VLP_PROCESS_ID')


def _add_bench(sub):
  bench = sub.add_parser('bench', help='benchmarks: step, matmuls, quality, data, retrieval').add_subparsers(dest='what', required=True)
  for what, help_ in (('step', 'examples/s, step time, MFU of the train step'),
                      ('matmuls', "the step's matmul-only floor")):
    p = bench.add_parser(what, help=help_)
    p.add_argument('--config', required=True)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--compare', default=None, choices=('open_clip', 'dense'),
                   help='open_clip: the same ALIGN model in open_clip; dense: the config without MoE')
    if what == 'step':
      p.add_argument('--profile', nargs='?', const='', default=None, metavar='DIR',
                     help='trace the timed steps into DIR (default: a fresh temp dir) and print their device '
                          'time by op category (open_clip too, with --compare=open_clip)')
    p.set_defaults(fn=cmd_bench)
  p = bench.add_parser('quality', help='held-out retrieval after training, vlp against open_clip side by side')
  p.add_argument('--config', required=True)
  p.add_argument('--compare', default='open_clip', choices=('open_clip', 'none'))
  p.add_argument('--json', default='', help='also write the rows and differences to this file')
  p.set_defaults(fn=cmd_bench_quality)
  p = bench.add_parser('data', help='images/s of the input pipeline (flags: vlp bench data -h)', add_help=False)
  p.set_defaults(fn=cmd_bench_data)  # its flags are parsed by vlp.bench.data
  p = bench.add_parser('retrieval', help='recall@K: chunked vs dense top-k (flags: -h)', add_help=False)
  p.set_defaults(fn=cmd_bench_retrieval)


def _add_import(sub):
  p = sub.add_parser('import', help="another framework's checkpoint (open_clip, transformers CLIP / SigLIP / "
                                   'BERT, big_vision) as a vlp export directory')
  p.add_argument('src', help='an open_clip directory (open_clip_config.json + open_clip_model.safetensors), a '
                             'transformers CLIPModel, SiglipModel, BertModel or BertForMaskedLM directory, or a '
                             'big_vision two-tower .npz')
  p.add_argument('--out', required=True)
  p.add_argument('--format', default=None, choices=('open_clip', 'hf', 'big_vision'), help='default: detected')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--tokenizer', default='', help="the SentencePiece .model of a source that ships none "
                 "(big_vision's): encode_text then takes strings")
  p.add_argument('--allow-pickle', '--allow_pickle', action='store_true',
                 help='read a source whose weights are only a torch pickle (pytorch_model.bin, '
                      'open_clip_pytorch_model.bin) with a restricted unpickler: tensors and dicts only (warns)')
  p.set_defaults(fn=cmd_import)


def cmd_plot(args, overrides):
  from vlp.eval import plot
  print(f'plot: {plot.plot(args.workdir, getattr(args, "out", None))}')


def _print_result(result):
  """The final metrics of training: a table per retrieval evaluator, then one JSON line."""
  from vlp.eval import itm_rerank, retrieval
  names = sorted({k.split('/')[0] for k in result if k.endswith('/i2t@1') and k.count('/') == 1})
  reranking = dict(itm_rerank.Evaluator.RERANKINGS)  # re-rankings of the top candidates (ALBEF's ITM)
  for name in names:
    print(f'[{name}]\n' + retrieval.format_table({k[len(name) + 1:]: v for k, v in result.items()
                                                   if k.startswith(name + '/')}))
    parts = sorted({k.split('/')[1] for k in result if k.startswith(name + '/') and k.count('/') == 2
                    and k.endswith('/i2t@1')})  # re-rankings, or languages
    for rerank in [p for p in parts if p in reranking]:
      prefix = f'{name}/{rerank}/'
      print(f'[{name}] re-ranked by {reranking[rerank]}\n' + retrieval.format_table(
          {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}))
    languages = [p for p in parts if p not in reranking]
    if languages:
      print(f'[{name}] RSUM by language: ' + ', '.join(f'{p} {result[f"{name}/{p}/rsum"]:.1f}' for p in languages))
  print(json.dumps(result, default=float))


def cmd_export(args, overrides):
  _join(args)
  from vlp import export
  dtype = 'bfloat16' if args.dtype == 'bf16' else args.dtype
  if args.format == 'hf':
    from vlp.interop import command
    out = command.export_hf(args.workdir, args.out, step=args.step, weights=args.weights)
  else:
    out = export.export(args.workdir, args.out, step=args.step, dtype=dtype, weights=args.weights,
                        max_shard_bytes=int(args.max_shard_gb * 2**30))
  import jax
  if jax.process_index() == 0:
    print(f'exported to {out}')


def cmd_bench_retrieval(args, overrides):
  from vlp.bench import retrieval
  retrieval.main(args.rest)


def cmd_bench_data(args, overrides):
  from vlp.bench import data
  data.main(args.rest)


def cmd_bench(args, overrides):
  from vlp.bench import step as bench_step
  from vlp.core.config import ConfigError
  config = _load_config(args.config, overrides)
  _set_compiler_flags(config)
  if args.what == 'matmuls':
    from vlp.bench import matmuls
    print(json.dumps(matmuls.run(config)))
    return
  profile_dir = None
  if args.profile is not None:
    from vlp.bench import op_profile
    profile_dir = op_profile.profile_dir(args.profile)
    print(f'profile: {profile_dir} (TensorBoard: tensorboard --logdir {profile_dir}; or xprof)', flush=True)
  if args.compare == 'dense' and not any(s.moe.num_experts for s in bench_step.moe_sections(config.model)):
    raise ConfigError("config key 'model': --compare=dense needs a model with MoE blocks (moe.num_experts > 0)")
  ref = None
  if args.compare == 'open_clip':  # first: on a GPU, JAX keeps the memory it used until it exits
    from vlp.bench import compare
    ref = compare.run_open_clip_reference(config.model, config.batch_size, steps=args.steps, warmup=args.warmup,
                                          device=compare.reference_device(), profile=profile_dir is not None)
  result = bench_step.run(config, steps=args.steps, warmup=args.warmup, profile_dir=profile_dir)
  if args.compare == 'dense':  # the same model with dense MLPs: equal active FLOPs under expert choice cf=1
    dense = bench_step.run(bench_step.dense_twin(config), steps=args.steps, warmup=args.warmup,
                           peak_flops=result['peak_tflops'] * 1e12,
                           profile_dir=profile_dir and os.path.join(profile_dir, 'dense'))
    result['vs_dense'] = bench_step.compare_dense(result, dense)
  if ref is not None:
    result['vs_open_clip'] = compare.side_by_side(
        result, ref, result['model_tflops_per_step'] * 1e12, result['peak_tflops'] * 1e12)
    print(compare.format_side_by_side(result['vs_open_clip']))
  if profile_dir:
    _print_profile(result, ref)
  print(json.dumps(result))


def _print_profile(result, ref):
  """The device time per step by op category: vlp's (each task's), and open_clip's beside it."""
  from vlp.bench import op_profile
  columns = {'open_clip': op_profile.torch_breakdown(ref['profile'])} if ref and ref.get('profile') else {}
  if columns:
    result['open_clip_profile'] = columns['open_clip']
  for name, r in (result['tasks'].items() if 'tasks' in result else [('', result)]):
    b = r['profile']
    print(f"device time per step by op category{f' ({name})' if name else ''}: vlp the mean of {b['devices']} "
          f"device(s) over {b['steps']} traced steps ({b['trace']})"
          + (f", open_clip {columns['open_clip']['time']} time" if columns else ''))
    print(op_profile.format_table({'vlp': b, **columns}))
    wall = f", open_clip {ref['step_ms']:.2f} ms" if columns else ''
    print(f"step, median wall time: vlp {r['step_ms']:.2f} ms{wall}")


def cmd_bench_quality(args, overrides):
  from vlp.bench import quality
  config = _load_config(args.config, overrides)
  _set_compiler_flags(config)
  result = quality.run(config, None if args.compare == 'none' else args.compare)
  print(quality.table(result))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


def cmd_compile(args, overrides):
  from vlp.compile import command, target
  target.prepare_env()  # before any JAX backend starts
  config = _load_config(args.config, overrides)
  _set_compiler_flags(config, 'tpu')  # the target's compiler, whatever the host
  hbm = None if args.hbm_gib is None else int(args.hbm_gib * 2 ** 30)
  return command.main(config, args.topology, args.num_slices, args.json, config_name=args.config,
                      variants=args.variants, evals=not args.no_eval, hbm_bytes=hbm)


def cmd_data(args, overrides):
  if args.tool == 'tokenizer':
    from vlp.data import tokenizer
    tokenizer.main(args.rest)
  else:
    from vlp.data import convert
    {'convert': convert.main_convert, 'check': convert.main_check}[args.tool](args.rest)


def _add_compile(sub):
  p = sub.add_parser('compile', help='compile the train step ahead of time for a TPU slice (memory, FLOPs, collectives)')
  p.add_argument('--config', required=True)
  p.add_argument('--topology', required=True, help='v5p-256 (v4/v5p: TensorCores; v5e/v6e: chips) or v5e:16x16')
  p.add_argument('--num_slices', type=int, default=1, help='slices joined by DCN; the data axis spans them')
  p.add_argument('--json', default=None, help='write the record here')
  p.add_argument('--variants', default='', help='comma-separated task variants to compile (default all)')
  p.add_argument('--no_eval', action='store_true', help='leave out the eval encoders')
  p.add_argument('--hbm_gib', type=float, default=None, help="HBM per chip to check against (default: the chip's)")
  p.set_defaults(fn=cmd_compile)


def main(argv=None, *, as_command=False):
  from vlp.checkpoint import SaveFailed, WorkdirMismatch
  from vlp.core.config import ConfigError
  from vlp.train.guard import Diverged
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
  _add_process_group(p)
  p.set_defaults(fn=cmd_train)
  p = sub.add_parser('eval', help="run the config's evaluators (config.evals) on a workdir checkpoint")
  p.add_argument('--workdir', required=True)
  p.add_argument('--config', default=None, help="optional: another config's evaluators (and overrides)")
  p.add_argument('--step', type=int, default=None)
  p.add_argument('--weights', default='params', choices=('params', 'ema'))
  p.add_argument('--json', default=None, help='results file (default WORKDIR/eval_STEP.json)')
  p.add_argument('--plot', action='store_true', help='also write WORKDIR/metrics.png')
  _add_process_group(p)
  p.set_defaults(fn=cmd_eval)
  _add_import(sub)
  p = sub.add_parser('plot', help="PNG of a workdir's loss and eval metrics over steps")
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', default=None, help='default WORKDIR/metrics.png')
  p.set_defaults(fn=cmd_plot)
  p = sub.add_parser('export', help='write safetensors + config + jax.export encoders')
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--step', type=int, default=None)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'bf16'))
  p.add_argument('--weights', default='params', choices=('params', 'ema'))
  p.add_argument('--format', default='vlp', choices=('vlp', 'hf'),
                 help="hf: a transformers CLIPModel (SiglipModel for the sigmoid head) directory (--workdir may be an "
                      "export or import)")
  p.add_argument('--max_shard_gb', type=float, default=2.0,
                 help='larger models are written as shards of this size with model.safetensors.index.json, '
                      'each shard by one process')
  _add_process_group(p)
  p.set_defaults(fn=cmd_export)
  _add_bench(sub)
  _add_compile(sub)
  p = sub.add_parser('data', help='data tools: `vlp data tokenizer|convert|check ...` (-h after the tool for its flags)')
  p.add_argument('tool', choices=('tokenizer', 'convert', 'check'))
  p.add_argument('rest', nargs=argparse.REMAINDER)
  p.set_defaults(fn=cmd_data)
  args, rest = parser.parse_known_args(argv)
  if args.fn in (cmd_bench_data, cmd_bench_retrieval):
    args.rest = rest
  elif rest:
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  if overrides and args.command not in ('train', 'eval', 'bench', 'compile'):
    parser.error(f'--config.* overrides do not apply to `vlp {args.command}`')
  # Data tools and eval data report bad paths and inputs as ValueError: one line, no traceback.
  from vlp.bench.compare import ReferenceEnvError  # the torch environment of a comparison is missing
  user_errors = (ConfigError, WorkdirMismatch, FileNotFoundError, ReferenceEnvError, Diverged) + \
      ((ValueError,) if args.command in ('data', 'eval', 'import', 'export') else ())
  try:
    rc = args.fn(args, overrides)
  except user_errors as e:
    print(f'vlp: error: {e}', file=sys.stderr)
    if as_command and isinstance(e, SaveFailed):
      _exit_now(2)
    return 2
  return rc or 0


def _exit_now(rc: int):
  """Exits without waiting for other threads: after the storage went away, its libraries' own
  threads would hold the exit for their retries (about 2 minutes); a scheduler should relaunch
  without that wait."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(rc)


def entry():
  """The `vlp` command; it exits at once after a checkpoint that could not be written. A run on
  the CPU first starts itself again keeping freed memory (vlp.core.host_memory)."""
  from vlp.core import host_memory
  host_memory.restart_keeping_freed_memory(sys.argv)
  sys.exit(main(as_command=True))


if __name__ == '__main__':
  entry()
