"""`vlp bench quality --compare=open_clip`: how well vlp learns against open_clip, side by side.

Both sides train at the config's architecture on the same examples in the same order
(vlp's own input pipeline, read once and handed to open_clip), with the same tokens,
pixels, batch size, steps and optimizer settings (AdamW, warm-up + cosine, clipping).
Then both embed the same held-out split and vlp's `recall_at_k` scores them by the same
rules (vlp.eval.retrieval: ties counted against, a caption an image has twice kept once).
vlp trains through its real trainer (`vlp train`); open_clip through the loop of its own trainer
(benchmarks/open_clip_train_ref.py, in the torch environment that
`launch/setup_bench_env.sh` makes). What still differs between the two setups is
printed under the table.

  vlp bench quality --config=configs/align_tiny.py --compare=open_clip
  vlp bench quality --config=configs/align_tiny.py --compare=open_clip --config.model.head=sigmoid
"""
import json
import os
import subprocess
import tempfile

import numpy as np

from vlp import plan as plan_lib
from vlp.bench import compare
from vlp.data import tokenizer as tokenizer_lib
from vlp.eval import datasets, retrieval
from vlp.models import align as align_model
from vlp.train import input as input_lib, loop
from vlp.workdir import metrics as metrics_lib

REF_SCRIPT = str(compare.BENCHMARKS / 'open_clip_train_ref.py')
KEYS = ('i2t@1', 't2i@1', 'i2t@5', 't2i@5', 'i2t@10', 't2i@10')

# open_clip's CLIP as its trainer builds it, in the terms of vlp's config (init: open_clip
# initialises its text tower as CLIP, its ViT with torch's defaults)
OPEN_CLIP = {'image pool': 'cls', 'text causal': True, 'text pool': 'eos', 'arch.init': 'clip text, torch-default vision',
             'arch.gelu': 'erf', 'arch.ln_eps': 1e-5, 'ln_pre (a LayerNorm before the ViT)': True,
             'patch embedding bias': False, 'optim.no_decay': (), 'label smoothing': 0.0}
OPEN_CLIP_SCALE = {'softmax': 1 / 0.07, 'sigmoid': 10.0}  # its CLIP's start; build_clip's for SigLIP


def examples(plan) -> dict:
  """The train batches vlp's pipeline yields for the whole run, and the held-out split."""
  config = plan.config
  if len(plan.variants) != 1:
    raise ValueError(f'vlp bench quality compares one task at one resolution; the config has '
                     f'{len(plan.variants)} variants')
  tokenizer = tokenizer_lib.for_config(config)
  iterator = input_lib.train_iterator(plan, tokenizer, plan.variants[0])
  images, texts = [], []
  for _ in range(config.total_steps):
    batch = next(iterator)
    images.append(np.asarray(batch['image'], np.uint8))
    texts.append(np.asarray(batch['text'], np.int32))
  held_out = datasets.task_data(config, tokenizer)
  if held_out is None:
    raise ValueError('vlp bench quality needs held-out data (config.data.eval or the built-in scenes)')
  return dict(train_image=np.concatenate(images), train_text=np.concatenate(texts),
              eval_image=held_out['image'], eval_text=held_out['text'],
              text_to_image=held_out['text_to_image']), tokenizer


def differences(config) -> list[str]:
  """What the two setups still do differently, in one line each."""
  m, a = config.model, config.model.arch
  ours = {'image pool': m.image.pool, 'text causal': m.text.causal, 'text pool': m.text.pool, 'arch.init': a.init, 'arch.gelu': a.gelu,
          'arch.ln_eps': a.ln_eps, 'ln_pre (a LayerNorm before the ViT)': m.image.ln_pre,
          'patch embedding bias': m.image.patch_bias,
          'optim.no_decay': tuple(config.optim.no_decay), 'label smoothing': config.loss.label_smoothing}
  lines = [f'{k}: vlp {ours[k]}, open_clip {OPEN_CLIP[k]}' for k in ours if str(ours[k]) != str(OPEN_CLIP[k])]
  scale = m.logit_scale_init or align_model.DEFAULT_SCALE[m.head]
  oc_scale = OPEN_CLIP_SCALE[m.head]
  if abs(scale - oc_scale) > 1e-6:
    lines.append(f'logit scale start: vlp {scale:.4g}, open_clip {oc_scale:.4g}')
  return lines


def _row(name, recall, scale):
  return dict(run=name, **{k: recall[k] for k in KEYS}, rsum=sum(recall[k] for k in KEYS), final_logit_scale=scale)


def run_vlp(config, workdir) -> dict:
  final = loop.train(config, workdir, progress=False)
  last = [r for r in metrics_lib.read_jsonl(workdir) if 'logit_scale' in r][-1]
  return _row('vlp', {k: final[f'retrieval/{k}'] for k in KEYS}, last['logit_scale'])


def run_open_clip(config, data: dict, tokenizer, tmp: str, python=None) -> dict:
  """open_clip trained on `data`, its held-out recall by vlp's rules: as vlp's evaluator, a
  caption an image has twice is kept once, and each distinct text is embedded once."""
  exe = compare.bench_python(python)
  data_path, setup_path, out_path = (os.path.join(tmp, n) for n in ('data.npz', 'setup.json', 'emb.npz'))
  captions = retrieval.distinct_captions(data['eval_text'], data['text_to_image'])
  np.savez(data_path, **{k: v for k, v in data.items() if k not in ('text_to_image', 'eval_text')},
           eval_text=captions['texts'])
  setup = dict(model=compare._to_plain(config.model), optim=compare._to_plain(config.optim), seed=config.seed,
               steps=config.total_steps, batch_size=config.batch_size, pad_id=0, sep_id=tokenizer.sep_id)
  with open(setup_path, 'w') as f:
    json.dump(setup, f)
  cmd = [exe, '-I', REF_SCRIPT, '--data', data_path, '--setup', setup_path, '--out', out_path]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    tail = '\n'.join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f'open_clip side failed (exit {proc.returncode}):\n{tail}')
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  emb = np.load(out_path)
  recall = retrieval.recall_at_k(emb['image_emb'], emb['text_emb'][captions['text_of']],
                                 data['text_to_image'][captions['keep']])
  return dict(_row('open_clip', recall, info['final_logit_scale']), **info)


def run(config, compare_with: str | None = 'open_clip', python=None) -> dict:
  import jax
  plan = plan_lib.make(config, jax.device_count(), jax.process_count())
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    rows.append(run_vlp(config, os.path.join(tmp, 'vlp')))
    if compare_with == 'open_clip':
      data, tokenizer = examples(plan)
      rows.append(run_open_clip(config, data, tokenizer, tmp, python))
  return dict(rows=rows, differences=differences(config))


def table(result) -> str:
  lines = [f"{'run':<10} {'I->T R@1':>9} {'T->I R@1':>9} {'RSUM':>7} {'final logit scale':>18}"]
  for r in result['rows']:
    lines.append(f"{r['run']:<10} {r['i2t@1']:>9.1f} {r['t2i@1']:>9.1f} {r['rsum']:>7.1f} {r['final_logit_scale']:>18.2f}")
  if result['differences']:
    lines += ['', 'the setups still differ in:'] + [f'  {d}' for d in result['differences']]
  return '\n'.join(lines)
