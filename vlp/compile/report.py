"""What `vlp compile` prints, and its JSON record."""
from vlp.compile import hlo

ACTIVATIONS = 'activations (est.)'  # the memory table's estimate row (vlp.core.parallel.memory_table)


def gib(x) -> str:
  """Bytes for people: GiB from 1 GiB on, else MiB."""
  return f'{x / 2 ** 30:.2f} GiB' if x >= 2 ** 30 else f'{x / 2 ** 20:.2f} MiB'


def _buffers(items) -> str:
  return '; '.join(f'{gib(b)} {shape} {what}' for b, shape, what in items)


def header(p, config_name, topo, num_slices, devices, processes, sizes):
  chip = topo.chip
  mesh = ' '.join(f'{a}={n}' for a, n in sizes.items())
  p(f'vlp compile {config_name}: {topo.name} = {topo.libtpu_name} ({topo.accelerator_type}), '
    f'{topo.num_chips} chips x {num_slices} slice(s) = {devices} devices, {processes} hosts; mesh {mesh}'
    + (f' (data over {num_slices} slices by DCN)' if num_slices > 1 else ''))
  p(f'chip {chip.name}: HBM {gib(chip.hbm_bytes)}, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, '
    f'{chip.hbm_bandwidth / 1e9:.0f} GB/s ({chip.source})')


def progress(p, e, chip):
  """One line as soon as a program is compiled (a paper-size compile takes many minutes)."""
  if 'memory' not in e:
    p(f'  {e["name"]}: compile refused: {e["error"]}')
    return
  mfu = e.get('mfu_ceiling')
  p(f'  compiled {e["name"]} in {e["compile_s"]:.1f} s: {gib(e["bytes_per_device"])} of {gib(chip.hbm_bytes)} '
    f'per device' + (f', model FLOPs/step {e["model_flops_per_step"]:.3e}, MFU ceiling {mfu:.2f}'
                     if mfu is not None else ''))


def memory_lines(p, programs, chip):
  big = max((e['memory']['total'] for e in programs if 'memory' in e), default=0) >= 2 ** 30
  unit, scale = ('GiB', 2 ** 30) if big else ('MiB', 2 ** 20)
  p(f'{"program":<28}{"args":>10}{"out":>10}{"alias":>10}{"temp":>10}{"total":>10}  / HBM  fits  compile s')
  for e in programs:
    if 'memory' not in e:
      p(f'{e["name"]:<28}  compile refused: {e["error"]}')
      continue
    m = e['memory']
    p(f'{e["name"]:<28}' + ''.join(f'{m[k] / scale:10.2f}' for k in ('argument', 'output', 'alias', 'temp', 'total'))
      + f'  {m["total"] / chip.hbm_bytes:5.0%}  {"yes" if e["fits"] else "NO ":<4} {e["compile_s"]:9.1f}')
  p(f'({unit} per device; total = args + out - alias (donated state) + temp + code)')


def step_lines(p, programs):
  for e in programs:
    if e['kind'] != 'train' or 'memory' not in e:
      continue
    lb = e['lower_bound_s']
    p(f'{e["name"]} (batch {e["batch_size"]}): model FLOPs/step {e["model_flops_per_step"]:.3e}; per device: '
      f'XLA FLOPs {e["xla_flops_per_device"]:.3e}, bytes accessed {e["bytes_accessed_per_device"]:.3e}')
    used = '; '.join(f'{op} {c["count"]}, {gib(c["bytes"])} (links {gib(c["link_bytes"])})'
                     for op, c in e['collectives'].items() if c['count'])
    p(f'  collectives per device per step (each logical op once, once a trip in a loop): {used or "none"} '
      f'(total {gib(e["collective_bytes_per_device"])})')
    p(f'  {link_line(e)}')
    if e['loops_unread']:
      p(f'  loops whose trip count could not be read, counted once: {", ".join(e["loops_unread"])}')
    p(f'  step time >= max(FLOPs / peak {lb["compute"] * 1e3:.3g} ms, bytes / HBM bandwidth '
      f'{lb["hbm"] * 1e3:.3g} ms) = {lb["step"] * 1e3:.3g} ms -> MFU ceiling {e["mfu_ceiling"]:.2f}')


def link_line(e) -> str:
  """The program's link bytes (ring volumes over each collective's group) against the config's
  ideal FSDP volume (programs.ideal_fsdp_bytes)."""
  line = f'link bytes per device per step {gib(e["link_bytes_per_device"])} (ring volumes over each op\'s group)'
  if not e.get('ideal_fsdp_bytes_per_device'):
    return line + '; no fsdp axis, no ideal FSDP volume beside it'
  return (line + f' = {e["link_to_ideal_fsdp"]:.2f}x the ideal FSDP {gib(e["ideal_fsdp_bytes_per_device"])} '
          '((fsdp-1)/fsdp x the fsdp-sharded params in the compute dtype: gathered in the forward, again in the '
          'backward under remat full, their gradients reduce-scattered once)')


def table_vs_compiled(table: dict, entry: dict | None, batch_bytes: int) -> dict:
  """The training-start memory table against the compiled train step with the largest total:
  its state rows against the compiled arguments less the batch, its activation estimate
  against the compiled temp buffers, its total against the compiled total."""
  state = sum(v for k, v in table.items() if k != ACTIVATIONS)
  out = {'table_total': sum(table.values()), 'table_state': state, 'table_activations': table.get(ACTIVATIONS)}
  if entry is None:
    return out
  m = entry['memory']
  args = m['argument'] - batch_bytes
  out.update(program=entry['name'], compiled_total=m['total'], compiled_state=args, compiled_temp=m['temp'],
             total_ratio=out['table_total'] / m['total'], state_ratio=state / args if args else None,
             activations_ratio=table[ACTIVATIONS] / m['temp'] if table.get(ACTIVATIONS) and m['temp'] else None)
  return out


def table_lines(p, table: dict, vs: dict, chip):
  p('memory table printed at training start (an estimate): ' + ', '.join(f'{k} {gib(v)}' for k, v in table.items())
    + f'; total {gib(vs["table_total"])}')
  if 'program' not in vs:
    return
  ratio = f' ({vs["activations_ratio"]:.2f}x)' if vs['activations_ratio'] else ''
  acts = (f'activations (est.) {gib(vs["table_activations"])} vs compiled temp {gib(vs["compiled_temp"])}{ratio}'
          if vs['table_activations'] is not None else 'no activation estimate')
  p(f'  against {vs["program"]} compiled for {chip.name}: state {gib(vs["table_state"])} vs compiled arguments '
    f'less the batch {gib(vs["compiled_state"])} ({vs["state_ratio"]:.2f}x); {acts}; total '
    f'{gib(vs["table_total"])} vs {gib(vs["compiled_total"])}: the table is {vs["total_ratio"]:.2f}x the compiled bytes')


def _largest_collectives(entries) -> dict:
  """Per op, the largest over the train variants (each step runs one of them)."""
  out = {op: {'count': 0, 'bytes': 0, 'link_bytes': 0.0} for op in hlo.COLLECTIVES}
  for e in entries:
    for op, c in e['collectives'].items():
      if c['bytes'] >= out[op]['bytes']:
        out[op] = dict(c)
  return out


def record(config_name, topo, num_slices, devices, processes, sizes, programs, table, vs) -> dict:
  chip = topo.chip
  train = [e for e in programs if e['kind'] == 'train' and 'memory' in e]
  most = lambda key: max((e[key] for e in train), default=None)
  fits = all(e['fits'] for e in programs)
  out = {
      'config': config_name, 'topology': topo.name, 'libtpu_topology': topo.libtpu_name,
      'accelerator_type': topo.accelerator_type, 'chip': chip.name, 'chips': topo.num_chips,
      'num_slices': num_slices, 'devices': devices, 'hosts': processes, 'mesh': dict(sizes), 'fits': fits,
      'bytes_per_device': max(e.get('bytes_per_device', 0) for e in programs),
      'hbm_bytes': chip.hbm_bytes, 'peak_flops': chip.peak_flops, 'hbm_bandwidth': chip.hbm_bandwidth,
      'flops_per_step': most('model_flops_per_step'), 'xla_flops_per_device': most('xla_flops_per_device'),
      'bytes_accessed_per_device': most('bytes_accessed_per_device'),
      'collectives': _largest_collectives(train),
      'collective_bytes_per_device': most('collective_bytes_per_device'),
      'link_bytes_per_device': most('link_bytes_per_device'),
      'ideal_fsdp_bytes_per_device': most('ideal_fsdp_bytes_per_device'),
      'loops_unread': sorted({w for e in train for w in e['loops_unread']}),
      'step_lower_bound_s': max((e['lower_bound_s']['step'] for e in train), default=None),
      'mfu_ceiling': min((e['mfu_ceiling'] for e in train if e.get('mfu_ceiling')), default=None),
      'memory_table': table, 'memory_table_vs_compiled': vs,
      'programs': programs, 'sources': {chip.name: chip.source},
  }
  link, ideal = out['link_bytes_per_device'], out['ideal_fsdp_bytes_per_device']
  out['link_to_ideal_fsdp'] = link / ideal if link is not None and ideal else None
  if not fits:
    worst = max(programs, key=lambda e: (not e['fits'], e.get('bytes_per_device', 0)))
    out.update(not_fitting=worst['name'], largest_buffers=worst.get('largest_buffers'))
  return out


def not_fit_line(rec) -> str:
  """One line: which program, how much, its largest buffers."""
  e = next(e for e in rec['programs'] if e['name'] == rec['not_fitting'])
  need = e.get('error') or f'needs {gib(e["bytes_per_device"])} per device'
  return (f'{rec["config"]} does not fit {rec["topology"]} ({gib(rec["hbm_bytes"])} HBM per chip): '
          f'{e["name"]}: {need}; largest buffers: {_buffers(rec["largest_buffers"] or [])}')
