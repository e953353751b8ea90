"""`vlp bench step --profile[=DIR]`: where a step's device time goes, by op category.

The timed steps run under `jax.profiler.trace(DIR)`, which writes what TensorBoard's profile
plugin / xprof read (DIR/plugins/profile/<run>/<host>.xplane.pb) and the same events as a
Chrome trace (<host>.trace.json.gz; Perfetto opens it too). This module reads the Chrome trace:
every event of an XLA instruction names it (`args.hlo_op`, `args.hlo_module`); the instruction
is looked up in the compiled step's HLO text and put in a category (vlp.bench.categories). An
event's time is its self time (less the instruction events nested in it: a while loop's body),
summed per category, per device and per step.

On a GPU or TPU only the device's events count (the streams' kernels); on the CPU backend
the host runs the program, one thread per simulated device: the table then gives each
device's mean, and with several simulated devices on few cores each one's time includes
waiting for a core (and a collective's, waiting for the other devices).
"""
import collections
import glob
import gzip
import json
import os
import tempfile

from vlp.bench import categories as categories_lib


def profile_dir(requested: str | None) -> str:
  """The directory to trace into: the one asked for, or a fresh one under the temp dir."""
  if requested:
    os.makedirs(requested, exist_ok=True)
    return os.path.abspath(requested)
  return tempfile.mkdtemp(prefix='vlp-profile-')


def trace_file(trace_dir: str) -> str:
  """The newest Chrome trace the profiler wrote under trace_dir."""
  found = [f for f in glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)]
  found = found or glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not found:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}: did the profiler run?')
  return max(found, key=os.path.getmtime)


def instruction_events(trace: dict, module: str = '') -> list:
  """The complete events ('X') of XLA instructions (of `module` if given); on a machine with
  accelerators only those of the '/device:...' processes."""
  names = {e['pid']: e.get('args', {}).get('name', '') for e in trace['traceEvents']
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  events = [e for e in trace['traceEvents'] if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})
            and (not module or e['args'].get('hlo_module', module) == module)]
  on_device = [e for e in events if names.get(e['pid'], '').startswith('/device:')]
  return on_device or events


def self_times(events: list) -> tuple[dict, int]:
  """({instruction: self time in µs, summed}, devices): an event's duration less that of the
  events nested in it on the same thread; devices = distinct (process, device ordinal)."""
  out, by_thread = collections.Counter(), collections.defaultdict(list)
  for e in events:
    by_thread[(e['pid'], e.get('tid'))].append(e)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    stack = []  # (end, instruction) of the enclosing events
    for e in thread:
      while stack and stack[-1][0] <= e['ts']:
        stack.pop()
      if stack:
        out[stack[-1][1]] -= e['dur']
      out[e['args']['hlo_op']] += e['dur']
      stack.append((e['ts'] + e['dur'], e['args']['hlo_op']))
  devices = {(e['pid'], e['args'].get('device_ordinal')) for e in events}
  return dict(out), max(len(devices), 1)


def breakdown(trace_dir: str, hlo_text: str, steps: int) -> dict:
  """Milliseconds per step and device by category, from the trace under trace_dir of `steps`
  runs of the program whose HLO text is hlo_text."""
  path = trace_file(trace_dir)
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  module, cats = categories_lib.classify(hlo_text)
  times, devices = self_times(instruction_events(trace, module))
  ms = dict.fromkeys(categories_lib.CATEGORIES, 0.0)
  for op, us in times.items():
    ms[cats.get(op, 'other')] += us / 1e3 / steps / devices
  unlisted = sorted(op for op in times if op not in cats)  # counted as 'other'
  return {'dir': trace_dir, 'trace': path, 'devices': devices, 'steps': steps, 'ms_per_step': ms,
          'unlisted': unlisted[:20]}


def torch_breakdown(ref_profile: dict) -> dict:
  """The open_clip reference's per-operator times (benchmarks/open_clip_ref.py --profile) by
  category: self device time where it ran on a GPU, self CPU time otherwise."""
  device = ref_profile.get('device', 'cpu') != 'cpu'
  ms = dict.fromkeys(categories_lib.CATEGORIES, 0.0)
  for name, scope, cpu_ms, device_ms in ref_profile['ops']:
    ms[categories_lib.torch_category(name, scope)] += device_ms if device else cpu_ms
  return {'steps': ref_profile['steps'], 'time': 'self device' if device else 'self CPU', 'ms_per_step': ms}


def format_table(columns: dict) -> str:
  """A table of ms per step and share by category, one pair of columns per {label: breakdown}."""
  head = f"{'category':<16}" + ''.join(f'{label + " ms":>16}{"share":>7}' for label in columns)
  rows = [head]
  totals = {label: sum(b['ms_per_step'].values()) for label, b in columns.items()}
  for cat in (*categories_lib.CATEGORIES, 'total'):
    cells = ''
    for label, b in columns.items():
      ms = totals[label] if cat == 'total' else b['ms_per_step'][cat]
      cells += f'{ms:>16.2f}{100 * ms / totals[label] if totals[label] else 0.0:>6.1f}%'
    rows.append(f'{cat:<16}{cells}')
  return '\n'.join(rows)
