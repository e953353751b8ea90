"""A PNG of a workdir's curves: training loss and eval metrics over steps (from metrics.jsonl)."""
import io

from vlp.core import paths
from vlp.workdir import layout, metrics as metrics_lib

# Eval metrics worth a curve; per-language ones ('retrieval/en/t2i@1') would crowd the plot.
_SHOWN = ('i2t@1', 't2i@1', 'i2t@5', 't2i@5', 'rsum', 'acc1', 'acc5', 'mean_per_class_recall')


def plot(workdir: str, out: str | None = None) -> str:
  """Writes the plot (default WORKDIR/metrics.png); returns its path."""
  import matplotlib
  matplotlib.use('Agg')  # no display needed
  import matplotlib.pyplot as plt
  rows = metrics_lib.read_jsonl(workdir)
  series = {}
  for r in rows:
    for k, v in r.items():
      name, _, metric = k.rpartition('/')
      # 'loss', or every IMP task's '<task>/loss'
      if k == 'loss' or (name and '/' not in name and metric in _SHOWN + ('loss',)
                         and not name.startswith(('time', 'skipped'))):
        series.setdefault(k, []).append((r['step'], v))
  losses = sorted(k for k in series if k == 'loss' or k.endswith('/loss'))
  evals = sorted(k for k in series if k not in losses and not k.endswith('rsum'))
  rsums = sorted(k for k in series if k.endswith('rsum'))
  panels = [('training loss', losses), ('eval (%)', evals), ('RSUM', rsums)]
  panels = [(t, ks) for t, ks in panels if ks and all(k in series for k in ks)]
  if not panels:
    raise ValueError(f'{workdir}/metrics.jsonl has no loss or eval metrics to plot')
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (title, keys) in zip(axes[0], panels):
    for k in keys:
      steps, values = zip(*series[k])
      ax.plot(steps, values, marker='o' if len(steps) < 20 else None, label=k)
    ax.set_title(title)
    ax.set_xlabel('step')
    if len(keys) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  out = out or layout.path(workdir, layout.PLOT)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100)
  paths.write_atomic(out, buf.getvalue())  # local or remote (gs://)
  plt.close(fig)
  return out
