"""Evaluators listed in `config.evals`, built once and run on params.

Every evaluator has the same tiny interface (big_vision's):
`Evaluator(predict_fns, **cfg).run(params)` yields `(name, value)`, where
predict_fns = {'image': f(params, images), 'text': f(params, tokens)} return
L2-normalised embeddings. Results are named '<entry>/<metric>' in training
metrics, and written as clip_benchmark-style records by `vlp eval`.
"""
from vlp.eval import datasets, itm_rerank, retrieval, zeroshot

# clip_benchmark's metric names for ours.
_CLIP_BENCHMARK_NAMES = {'i2t': 'text_retrieval_recall', 't2i': 'image_retrieval_recall'}
TASKS = {'retrieval': 'zeroshot_retrieval', 'zeroshot': 'zeroshot_classification'}


def predict_fns(graphdef, vision: str = 'image') -> dict:
  """vision='video' (IMP's clips) puts the video encoder where evaluators call 'image'."""
  from flax import nnx
  return {'image': lambda params, x: getattr(nnx.merge(graphdef, params), f'encode_{vision}')(x),
          'text': lambda params, t: nnx.merge(graphdef, params).encode_text(t)}


def _dataset_name(e, config) -> str:
  data = config.data
  if e.data == 'task':
    return {'synthetic': 'vlp/synthetic', 'tfds': data.tfds.name}.get(data.name, data.eval)
  return {'synthetic': 'vlp/synthetic', 'synthetic_video': 'vlp/synthetic_video', 'tfds': e.tfds_name}.get(e.data, e.path)


def make(config, graphdef, tokenizer, task_data=None) -> list:
  """[(name, entry, evaluator)] for every entry of config.evals that has data.

  A 'task' retrieval entry uses the held-out split of config.data (task_data
  when the caller has it already) and is left out when the config names none.
  """
  from vlp import tasks
  out = []
  for name, e in sorted(config.evals.items()):
    fns = predict_fns(graphdef, 'video' if e.data == 'synthetic_video' else 'image')
    if e.kind == 'retrieval':
      data = (task_data if task_data is not None else tasks.eval_data(config, tokenizer)) if e.data == 'task' \
          else datasets.retrieval_data(e, config, tokenizer)
      if data is None:
        continue
      if data.get('skipped'):
        print(f"eval {name}: skipped {data['skipped']}")
      if config.model.name == 'albef':  # ITC retrieval, then the top candidates re-ranked by ITM
        ev = itm_rerank.Evaluator(graphdef, data, config.albef.rerank_k, batch_size=e.batch_size,
                                  ks=tuple(e.ks), by_language=e.by_language)
      else:
        ev = retrieval.Evaluator(fns, data, batch_size=e.batch_size, ks=tuple(e.ks), by_language=e.by_language)
    else:
      data = datasets.classification_data(e, config)
      templates = tuple(e.templates) or {'synthetic': zeroshot.SYNTHETIC_TEMPLATES,
                                         'synthetic_video': zeroshot.VIDEO_TEMPLATES}.get(e.data, zeroshot.CLIP_TEMPLATES)
      length = config.model.text.context_length
      ev = zeroshot.Evaluator(fns, data, lambda texts: tokenizer.encode(texts, length), templates,
                              batch_size=e.batch_size)
    out.append((name, e, ev))
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
      named[f'{lang}/{key}' if lang else key] = v / 100.0 if key != 'rsum' else v  # fractions, as clip_benchmark
    out.append({'dataset': _dataset_name(e, config), 'model': model, 'task': TASKS[e.kind], 'eval': name,
                'step': step, 'metrics': named})
  return out


def format_tables(evaluators, metrics: dict) -> str:
  """One printed table per evaluator."""
  parts = []
  for name, e, _ in evaluators:
    mine = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(name + '/')}
    if e.kind == 'retrieval':
      table = retrieval.format_table(mine, tuple(e.ks))
      for rerank, title in (('itm', 'ITM'), ('itm_itc', 'ITM + ITC')):  # ALBEF: the top k re-ranked
        scores = {k[len(rerank) + 1:]: v for k, v in mine.items() if k.startswith(rerank + '/')}
        if scores:
          table += f'\nre-ranked by {title}:\n' + retrieval.format_table(scores, tuple(e.ks))
      langs = sorted({k.split('/')[0] for k in mine if '/' in k} - {'itm', 'itm_itc'})
      table += ''.join(f'\n  {lang}: RSUM {mine[f"{lang}/rsum"]:.1f}' for lang in langs)
    else:
      table = '  '.join(f'{k} {v:6.2f}' for k, v in mine.items())
    parts.append(f'[{name}] {e.kind} on {e.data}\n{table}')
  return '\n'.join(parts)
