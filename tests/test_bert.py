"""BERT in and out of vlp (issue 17): transformers' BertModel and BertForMaskedLM built on the spot
with random weights (in the open_clip environment), imported, run, exported back and loaded by
from_pretrained; ALBEF's text stack started from the import (`init.text_from`) computes BERT's
hidden states; captions read through the import's WordPiece tokenizer as transformers reads them."""
import json
import os
import string
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_model, tiny_config, transformers_python
from flax import nnx

from vlp import cli, export, pretrained, recipes
from vlp.core import trees, weights_files
from vlp.core.config import ConfigError
from vlp.models import layers

REF = os.path.join(os.path.dirname(__file__), 'hf_bert_ref.py')
CONTEXT, DEPTH = 16, 3
# WordPiece: the specials, every letter alone and as a continuation, a few whole words: any caption
VOCAB = (['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + list(string.ascii_lowercase)
         + ['##' + c for c in string.ascii_lowercase] + ['the', 'red', 'blue', 'circle', 'square', 'left', 'of'])
HF_CONFIG = {'vocab_size': len(VOCAB), 'hidden_size': 32, 'num_hidden_layers': DEPTH, 'num_attention_heads': 2,
             'intermediate_size': 64, 'max_position_embeddings': CONTEXT}
TEXTS = ['A red circle', 'the blue squares, left of the red circle and the square, left of the big squares']


def _tokens():
  rng = np.random.default_rng(0)
  tokens = np.zeros((4, CONTEXT), np.int32)
  for i, n in enumerate((3, 14, 1, 8)):  # [CLS] words [SEP] padding
    tokens[i, 0], tokens[i, 1:n + 1], tokens[i, n + 1] = 2, rng.integers(5, len(VOCAB), n), 3
  return tokens


def _ref(tmp_path, mode, out, *extra):
  """Runs tests/hf_bert_ref.py; its outputs.npz."""
  np.save(tmp_path / 'tokens.npy', _tokens())
  (tmp_path / 'texts.json').write_text(json.dumps(TEXTS))
  (tmp_path / 'cfg.json').write_text(json.dumps(HF_CONFIG))
  (tmp_path / 'vocab.json').write_text(json.dumps(VOCAB))
  args = ['--tokens', str(tmp_path / 'tokens.npy'), '--texts', str(tmp_path / 'texts.json'), '--out', str(out)]
  if mode == 'build':
    args += ['--config', str(tmp_path / 'cfg.json'), '--vocab', str(tmp_path / 'vocab.json'), *extra]
  proc = subprocess.run([transformers_python(), REF, mode, *args], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out / 'outputs.npz'))


def test_a_post_ln_block_is_berts_layer_by_the_formula():
  """Block(post_ln=True) against BERT's layer written out in numpy: LN(x + attn(x)), LN(h + mlp(h))."""
  arch = layers.Arch(gelu='erf', ln_eps=1e-12)
  block = layers.Block(8, 2, 16, rngs=nnx.Rngs(0), arch=arch, post_ln=True)
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(block, nnx.Param)))
  rng = np.random.default_rng(1)
  p = jax.tree.map(lambda v: v + 0.1 * rng.normal(size=v.shape).astype(np.float32), p)
  nnx.update(block, p)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)

  def ln(v, g):
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-12) * g['scale'] + g['bias']
  a = p['attn']
  q, k, v = (np.einsum('bld,dhk->bhlk', x, a['qkv'][:, i]) + a['qkv_bias'][i][None, :, None] for i in range(3))
  logits = np.einsum('bhqk,bhsk->bhqs', q, k) / np.sqrt(4) + np.where(mask, 0, -1e30)[:, None, None]
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attn = np.einsum('bhqs,bhsk,hkd->bqd', weights, v, a['out']) + a['out_bias']
  h = ln(x + attn, p['ln1'])
  from scipy.special import erf
  m = p['mlp']
  pre = h @ m['fc1']['kernel'] + m['fc1']['bias']
  want = ln(h + (0.5 * pre * (1 + erf(pre / np.sqrt(2)))) @ m['fc2']['kernel'] + m['fc2']['bias'], p['ln2'])
  np.testing.assert_allclose(np.asarray(block(jnp.asarray(x), jnp.asarray(mask))), want, atol=2e-5)


def test_a_bert_model_is_not_trained_alone_and_says_so():
  config = recipes.base_config('bert')
  with pytest.raises(ConfigError, match="'bert' is a text encoder imported to start from.*init.text_from"):
    recipes.get('bert').validate(config)


@pytest.mark.parametrize('mlm', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_transformers_bert_in_and_out(tmp_path, mlm):
  """BertForMaskedLM (or BertModel) -> vlp import -> hidden states, MLM logits (pooler), and strings
  through its WordPiece tokenizer as transformers tokenises them; vlp export --format=hf ->
  from_pretrained gives the same outputs again."""
  src = tmp_path / 'hf'
  want = _ref(tmp_path, 'build', src, *(['--mlm'] if mlm else []))
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  meta = json.loads((tmp_path / 'vlp' / 'config.json').read_text())
  assert meta['model']['name'] == 'bert' and meta['model']['mlm_head'] == mlm and meta['model']['pooler'] != mlm
  enc = pretrained.load(str(tmp_path / 'vlp'))
  tokens = _tokens()
  diffs = {'import hidden': np.abs(enc.encode_text(tokens) - want['last']).max()}
  model, _ = export.load(str(tmp_path / 'vlp'))
  head = 'mlm_logits' if mlm else 'pooled'
  got_head = model.mlm_logits(tokens) if mlm else model.pooled(tokens)
  diffs[f'import {head}'] = np.abs(np.asarray(got_head) - want[head]).max()
  np.testing.assert_array_equal(enc.tokenize(TEXTS), want['text_ids'])  # WordPiece, cut with [SEP] kept, padded
  assert want['text_ids'][1, -1] == 3 and (want['text_ids'][0] == 0).any()
  with pytest.raises(ValueError, match='text encoder: it has no image encoder'):
    enc.encode_image(np.zeros((1, 16, 16, 3), np.uint8))

  back = tmp_path / 'hf_back'
  assert cli.main(['export', f'--workdir={tmp_path / "vlp"}', '--format=hf', f'--out={back}']) == 0
  again = _ref(tmp_path, 'run', back)
  diffs.update({'export hidden': np.abs(again['last'] - want['last']).max(),
                f'export {head}': np.abs(again[head] - want[head]).max()})
  np.testing.assert_array_equal(again['text_ids'], want['text_ids'])  # the tokenizer travelled on
  print(f'transformers BERT parity (mlm={mlm}):', {k: f'{v:.2e}' for k, v in diffs.items()})
  assert max(diffs.values()) <= 1e-4, diffs


def _albef_from_bert(tmp_path, **overrides):
  bert = tmp_path / 'vlp'
  config = tiny_config('albef', **{
      'model.text.depth': DEPTH, 'model.text.post_ln': True, 'model.text.vocab_size': len(VOCAB),
      'model.text.context_length': CONTEXT, 'model.fusion_layer': 2, 'model.arch.gelu': 'erf',
      'model.arch.ln_eps': 1e-12, 'init.text_from': str(bert), 'data.tokenizer': str(bert / 'tokenizer.json'),
      **overrides})
  return config


def test_albefs_text_stack_started_from_bert_computes_berts_hidden_states(tmp_path):
  """init.text_from: BERT's first fusion_layer layers are ALBEF's text encoder (its output is
  BERT's hidden state after them), the rest the fusion blocks' self-attention and MLP; the MLM
  head is BERT's; the cross-attention starts fresh."""
  src = tmp_path / 'hf'
  want = _ref(tmp_path, 'build', src, '--mlm')
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  config = _albef_from_bert(tmp_path)
  recipe = recipes.get('albef')
  recipe.validate(config)
  model = build_model(config.model)
  abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  from vlp.train import init_from
  lines = []
  loaded = init_from.load(config, abstract, log=lines.append, sources=recipe.init_sources(config))
  assert lines[0].startswith('init.text_from ') and 'kept at their init' in lines[1], lines
  assert 'in the source, not in this model' not in ''.join(lines)
  params = jax.tree.map(lambda fresh, given: fresh if given is None else given, abstract, loaded)
  nnx.update(model, params)
  tokens = _tokens()
  diff = np.abs(np.asarray(model.text.encode(tokens)) - want['hidden'][2]).max()
  print(f'ALBEF text encoder against BERT hidden_states[2]: {diff:.2e}')
  assert diff <= 1e-4
  flat, imported = dict(trees.flatten(params)), weights_files.read(str(tmp_path / 'vlp'))
  np.testing.assert_array_equal(flat['text.fusion_blocks.0.attn.qkv'], imported['text.text_blocks.2.attn.qkv'])
  np.testing.assert_array_equal(flat['mlm_head.dense.kernel'], imported['mlm_head.dense.kernel'])
  assert not np.array_equal(flat['text.fusion_blocks.0.cross.q'], 0)  # fresh, not taken


def test_init_text_from_checks_the_layout_before_anything_is_built(tmp_path):
  src = tmp_path / 'hf'
  _ref(tmp_path, 'build', src, '--mlm')
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  recipe = recipes.get('albef')
  with pytest.raises(ConfigError, match="'model.text.post_ln'.*post-LN"):
    recipe.validate(_albef_from_bert(tmp_path, **{'model.text.post_ln': False}))
  with pytest.raises(ConfigError, match="'data.tokenizer'.*tokenizer.json"):
    recipe.validate(_albef_from_bert(tmp_path, **{'data.tokenizer': 'builtin'}))
  with pytest.raises(ConfigError, match=r"'model.text.depth': 4, but the BERT of init.text_from .* has 3"):
    recipe.init_sources(_albef_from_bert(tmp_path, **{'model.text.depth': 4}))
  with pytest.raises(ConfigError, match="'model.arch.ln_eps'"):
    recipe.init_sources(_albef_from_bert(tmp_path, **{'model.arch.ln_eps': 1e-5}))


@pytest.mark.slow
def test_albef_trains_from_a_bert_import_on_the_built_in_data(tmp_path):
  """`vlp train` of tiny ALBEF with init.text_from and the import's tokenizer.json: captions in
  BERT's WordPiece ids, MLM masking BERT's [MASK] and never its special tokens, finite losses,
  and an export whose encode_text takes strings through that tokenizer."""
  src = tmp_path / 'hf'
  _ref(tmp_path, 'build', src, '--mlm')
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  config = _albef_from_bert(tmp_path, total_steps=4, **{'model.text.context_length': 12})  # BERT's first 12 positions
  del config.evals['retrieval']
  from vlp.data import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.for_config(config)
  assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.special_ids) == (2, 3, 4, (0, 1, 2, 3, 4))
  from vlp.recipes.albef import masking
  ids = tokenizer.encode(TEXTS, 12)
  masked, labels = masking.mlm_mask(ids, np.random.default_rng(0), vocab_size=tokenizer.vocab_size,
                                    mask_id=tokenizer.mask_id, special_ids=tokenizer.special_ids, prob=0.9)
  assert (labels[np.isin(ids, tokenizer.special_ids)] == masking.IGNORE_INDEX).all() and (masked == 4).any()
  from vlp.train import loop
  loop.train(config, str(tmp_path / 'wd'), progress=False)
  lines = [json.loads(line) for line in (tmp_path / 'wd' / 'metrics.jsonl').read_text().splitlines()]
  losses = [m['loss_mlm'] for m in lines if 'loss_mlm' in m]
  assert len(losses) == 4 and np.isfinite(losses).all(), lines
  assert cli.main(['export', f'--workdir={tmp_path / "wd"}', f'--out={tmp_path / "exp"}']) == 0
  enc = pretrained.load(str(tmp_path / 'exp'))
  np.testing.assert_array_equal(enc.tokenize(TEXTS), ids)
  assert enc.encode_text(TEXTS).shape == (2, config.model.embed_dim)


@pytest.mark.parametrize('recipe', ['albef', 'imp'])
def test_a_model_transformers_has_no_class_for_is_refused_in_one_line(recipe):
  from vlp.interop import command
  model_cfg = recipes.base_config(recipe).model
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(model_cfg)), nnx.Param))
  converter, name, why = command._converter(model_cfg.to_dict(), params, {'eos_id': 3})
  assert converter is None and len(why) == 1 and why[0].startswith(f"the {recipe} model's params go beyond"), why
