"""Evaluators listed in `config.evals`, built once and run on params.

Evaluators are registered by kind (`KINDS`: retrieval, itm_rerank,
zeroshot) and have the same tiny interface (big_vision's):
`Evaluator(predict_fns, ...).run(params)` yields `(name, value)`, where
predict_fns are the recipe's ({'image': f(params, images), 'text':
f(params, tokens), ...} returning L2-normalised embeddings). Results are named '<entry>/<metric>' in training
metrics, and written as clip_benchmark-style records by `vlp eval`.
"""
from vlp.data import sources
from vlp.eval import datasets, itm_rerank, retrieval, zeroshot

# clip_benchmark's metric names for ours.
_CLIP_BENCHMARK_NAMES = {'i2t': 'text_retrieval_recall', 't2i': 'image_retrieval_recall'}
TASKS = {'retrieval': 'zeroshot_retrieval', 'itm_rerank': 'zeroshot_retrieval', 'zeroshot': 'zeroshot_classification'}


def _dataset_name(e, config) -> str:
  if e.data == sources.TASK:
    return sources.of_dataset(config).describe(config)
  return sources.SOURCES[e.data].describe(config, e)


def _retrieval(name, e, ctx):
  data = ctx.task_data() if e.data == sources.TASK else datasets.retrieval_data(e, ctx.config, ctx.tokenizer)
  if data is None:
    return None
  if data.get('skipped'):
    print(f"eval {name}: skipped {data['skipped']}")
  return data


def build_retrieval(name, e, fns, ctx):
  data = _retrieval(name, e, ctx)
  return data and retrieval.Evaluator(fns, data, batch_size=e.batch_size, ks=tuple(e.ks), by_language=e.by_language)


def build_itm_rerank(name, e, fns, ctx):
  """ITC retrieval, then the top rerank_k candidates re-ranked by the ITM head."""
  data = _retrieval(name, e, ctx)
  return data and itm_rerank.Evaluator(fns, data, e.rerank_k, batch_size=e.batch_size, ks=tuple(e.ks),
                                       by_language=e.by_language)


def build_zeroshot(name, e, fns, ctx):
  data = datasets.classification_data(e, ctx.config)
  length = ctx.config.model.text.context_length
  return zeroshot.Evaluator(fns, data, lambda texts: ctx.tokenizer.encode(texts, length), data['templates'],
                            batch_size=e.batch_size)


# evaluator kind (config.evals.NAME.kind) -> builder(name, entry, predict_fns, context) -> evaluator or None
KINDS = {'retrieval': build_retrieval, 'itm_rerank': build_itm_rerank, 'zeroshot': build_zeroshot}


class _Context:
  """What builders share: the config, the tokenizer, the held-out split of config.data (read once)."""

  def __init__(self, config, tokenizer, task_data):
    self.config, self.tokenizer, self._task_data = config, tokenizer, task_data

  def task_data(self):
    if self._task_data is None:
      self._task_data = datasets.task_data(self.config, self.tokenizer, **datasets.this_host())
    return self._task_data


def make(config, predict_fns: dict, tokenizer, task_data=None) -> list:
  """[(name, entry, evaluator)] for every entry of config.evals that has data.

  predict_fns: the recipe's (`recipe.predict_fns(graphdef)`); an entry on video data
  ('synthetic_video') puts the 'video' encoder where evaluators call 'image'. A 'task'
  retrieval entry uses the held-out split of config.data (task_data when the caller has
  it already) and is left out when the config names none.
  """
  ctx = _Context(config, tokenizer, task_data)
  out = []
  for name, e in sorted(config.evals.items()):
    fns = dict(predict_fns, image=predict_fns[sources.vision_of(e.data)])
    evaluator = KINDS[e.kind](name, e, fns, ctx)
    if evaluator is not None:
      out.append((name, e, evaluator))
  return out


def run(evaluators, params) -> dict:
  """{'<entry>/<metric>': value} of every evaluator."""
  return {f'{name}/{k}': v for name, _, ev in evaluators for k, v in ev.run(params)}


def records(evaluators, metrics: dict, config, model: str, step=None) -> list[dict]:
  """clip_benchmark-like result records, one per evaluator:
  {"dataset", "model", "task", "metrics": {"image_retrieval_recall@5": ...}}."""
  out = []
  for name, e, _ in evaluators:
    mine = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(name + '/')}
    named = {}
    for k, v in mine.items():
      lang, _, key = k.rpartition('/')
      d, at, kk = key.partition('@')
      key = f'{_CLIP_BENCHMARK_NAMES[d]}@{kk}' if at and d in _CLIP_BENCHMARK_NAMES else key
      unscaled = key == 'rsum' or key in retrieval.COUNTS
      named[f'{lang}/{key}' if lang else key] = v if unscaled else v / 100.0  # fractions, as clip_benchmark
    out.append({'dataset': _dataset_name(e, config), 'model': model, 'task': TASKS[e.kind], 'eval': name,
                'step': step, 'metrics': named})
  return out


def format_tables(evaluators, metrics: dict) -> str:
  """One printed table per evaluator."""
  parts = []
  for name, e, ev in evaluators:
    mine = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(name + '/')}
    if isinstance(ev, retrieval.Evaluator):
      table = retrieval.format_table(mine, tuple(e.ks))
      for rerank, title in ev.RERANKINGS:  # the top k re-ranked (ALBEF's ITM)
        scores = {k[len(rerank) + 1:]: v for k, v in mine.items() if k.startswith(rerank + '/')}
        table += f'\nre-ranked by {title}:\n' + retrieval.format_table(scores, tuple(e.ks))
      langs = sorted({k.split('/')[0] for k in mine if '/' in k} - {r for r, _ in ev.RERANKINGS})
      table += ''.join(f'\n  {lang}: RSUM {mine[f"{lang}/rsum"]:.1f}' for lang in langs)
    else:
      table = '  '.join(f'{k} {v:6.2f}' for k, v in mine.items())
    parts.append(f'[{name}] {e.kind} on {e.data}\n{table}')
  return '\n'.join(parts)
