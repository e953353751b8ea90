"""transformers' BertModel / BertForMaskedLM <-> vlp's BERT (vlp.models.bert), both ways, exactly.

The names, from transformers' to vlp's (a `bert.` prefix, BertForMaskedLM's, dropped; the
LayerNorm `gamma`/`beta` of older checkpoints read as `weight`/`bias`):
- `embeddings.word_embeddings` <-> `text.token_embed`; `embeddings.position_embeddings` plus
  the token-type embedding of segment 0 <-> `text.pos_embed` (captions are one segment: the
  other segments' embeddings are not kept, and an export writes them as zeros);
  `embeddings.LayerNorm` <-> `text.embed_ln`;
- per layer, `attention.self.{query,key,value}` <-> `attn.qkv` [W, 3, heads, head_dim],
  `attention.output.dense` <-> `attn.out`, `attention.output.LayerNorm` <-> `ln1`,
  `intermediate.dense` / `output.dense` <-> `mlp.fc1` / `mlp.fc2`, `output.LayerNorm` <-> `ln2`
  (post-LN: each LayerNorm follows its residual sum);
- `pooler.dense` <-> `pooler`; `cls.predictions.transform.{dense,LayerNorm}` <->
  `mlm_head.{dense,ln}`, `cls.predictions.bias` <-> `mlm_head.bias` (the decoder is tied to
  the word embeddings, as in every BERT checkpoint).
"""
import json

import numpy as np

from vlp.core import paths
from vlp.interop import hf_clip

ARCHITECTURES = ('BertModel', 'BertForMaskedLM', 'BertForPreTraining')
ACT = {'erf': 'gelu', 'tanh': 'gelu_pytorch_tanh'}  # vlp arch.gelu -> hidden_act
_READ_ACT = {**{a: g for g, a in ACT.items()}, 'gelu_new': 'tanh'}


def claims(model: dict) -> bool:
  """A vlp model config this converter writes: a text encoder alone."""
  return 'image' not in model


# ---- transformers -> vlp

def model_config(src: str) -> dict:
  """vlp model config updates (recipe 'bert') of a BertConfig."""
  with paths.open(paths.join(src, hf_clip.CONFIG)) as f:
    cfg = json.load(f)
  problems = []
  if cfg.get('hidden_act', 'gelu') not in _READ_ACT:
    problems.append(f"hidden_act {cfg['hidden_act']!r} (vlp builds {sorted(_READ_ACT)})")
  if cfg.get('position_embedding_type', 'absolute') != 'absolute':
    problems.append(f"position_embedding_type {cfg['position_embedding_type']!r} (vlp: absolute)")
  if cfg.get('pad_token_id', 0) != 0:
    problems.append(f"pad_token_id {cfg['pad_token_id']} (vlp masks id 0 as padding)")
  if cfg.get('is_decoder') or cfg.get('add_cross_attention'):
    problems.append('a decoder or cross-attention layers')
  if problems:
    raise ValueError(f'vlp import: {src}: a BERT vlp does not build: ' + '; '.join(problems))
  text = dict(vocab_size=cfg['vocab_size'], context_length=cfg['max_position_embeddings'], width=cfg['hidden_size'],
              depth=cfg['num_hidden_layers'], num_heads=cfg['num_attention_heads'],
              mlp_dim=cfg['intermediate_size'], post_ln=True)
  return dict(text=text, arch=dict(init='xavier', gelu=_READ_ACT[cfg.get('hidden_act', 'gelu')],
                                   ln_eps=float(cfg.get('layer_norm_eps', 1e-12))))


def canonical(sd: dict) -> dict:
  """A BERT state dict without the `bert.` prefix, LayerNorm gamma/beta named weight/bias."""
  out = {}
  for k, v in sd.items():
    k = k.removeprefix('bert.')
    if '.LayerNorm.' in k:
      k = k.replace('.gamma', '.weight').replace('.beta', '.bias')
    out[k] = v
  return out


def heads(sd: dict) -> dict:
  """{'pooler': bool, 'mlm_head': bool}: which of BertModel's pooler and BertForMaskedLM's head sd has."""
  return {'pooler': 'pooler.dense.weight' in sd, 'mlm_head': 'cls.predictions.transform.dense.weight' in sd}


def _ln(sd, prefix):
  return {'scale': sd[f'{prefix}.weight'], 'bias': sd[f'{prefix}.bias']}


def _dense(sd, prefix):
  return {'kernel': sd[f'{prefix}.weight'].T, 'bias': sd[f'{prefix}.bias']}


def _layer_to_vlp(sd, prefix, heads_):
  get = lambda n: sd[f'{prefix}{n}']
  width = get('attention.self.query.weight').shape[1]
  hd = width // heads_
  names = ('query', 'key', 'value')
  return {'ln1': _ln(sd, f'{prefix}attention.output.LayerNorm'), 'ln2': _ln(sd, f'{prefix}output.LayerNorm'),
          'attn': {'qkv': np.stack([get(f'attention.self.{n}.weight').T.reshape(width, heads_, hd) for n in names],
                                   axis=1),
                   'qkv_bias': np.stack([get(f'attention.self.{n}.bias').reshape(heads_, hd) for n in names]),
                   'out': get('attention.output.dense.weight').T.reshape(heads_, hd, width),
                   'out_bias': get('attention.output.dense.bias')},
          'mlp': {'fc1': _dense(sd, f'{prefix}intermediate.dense'), 'fc2': _dense(sd, f'{prefix}output.dense')}}


def to_vlp(sd: dict, model: dict) -> dict:
  """vlp params of a canonical BERT state dict (`canonical`)."""
  tx = model['text']
  e = 'embeddings.'
  decoder = sd.get('cls.predictions.decoder.weight')
  if decoder is not None and not np.array_equal(decoder, sd[f'{e}word_embeddings.weight']):
    raise ValueError('vlp import: a BERT whose MLM decoder is not tied to its word embeddings')
  text = {'token_embed': sd[f'{e}word_embeddings.weight'],
          'pos_embed': sd[f'{e}position_embeddings.weight'] + sd[f'{e}token_type_embeddings.weight'][0],
          'embed_ln': _ln(sd, f'{e}LayerNorm'),
          'text_blocks': {i: _layer_to_vlp(sd, f'encoder.layer.{i}.', tx['num_heads']) for i in range(tx['depth'])}}
  params = {'text': text}
  if model['pooler']:
    params['pooler'] = _dense(sd, 'pooler.dense')
  if model['mlm_head']:
    t = 'cls.predictions.transform.'
    params['mlm_head'] = {'dense': _dense(sd, f'{t}dense'), 'ln': _ln(sd, f'{t}LayerNorm'),
                          'bias': sd.get('cls.predictions.bias', sd.get('cls.predictions.decoder.bias'))}
  return params


# ---- vlp -> transformers

def exportable(model: dict, params: dict) -> list[str]:
  """Why a vlp text encoder (config and params) is not a BertModel / BertForMaskedLM (empty when it is)."""
  tx, arch = model['text'], model.get('arch', {})
  why = []
  if not tx.get('post_ln'):
    why.append('pre-LN blocks (BERT is post-LN: model.text.post_ln=True)')
  if tx['moe'].get('num_experts'):
    why.append('MoE blocks')
  if arch.get('gelu', 'tanh') not in ACT:
    why.append(f"gelu {arch.get('gelu')!r}")
  return why


def _layer_to_hf(blk, prefix):
  a = blk['attn']
  width = a['qkv'].shape[0]
  out = {}
  for i, n in enumerate(('query', 'key', 'value')):
    out[f'{prefix}attention.self.{n}.weight'] = np.asarray(a['qkv'])[:, i].reshape(width, width).T
    out[f'{prefix}attention.self.{n}.bias'] = np.asarray(a['qkv_bias'])[i].reshape(width)
  out[f'{prefix}attention.output.dense.weight'] = np.asarray(a['out']).reshape(width, width).T
  out[f'{prefix}attention.output.dense.bias'] = a['out_bias']
  for vlp_name, hf_name in (('ln1', 'attention.output.LayerNorm'), ('ln2', 'output.LayerNorm')):
    out[f'{prefix}{hf_name}.weight'], out[f'{prefix}{hf_name}.bias'] = blk[vlp_name]['scale'], blk[vlp_name]['bias']
  for vlp_name, hf_name in (('fc1', 'intermediate.dense'), ('fc2', 'output.dense')):
    out[f'{prefix}{hf_name}.weight'] = np.asarray(blk['mlp'][vlp_name]['kernel']).T
    out[f'{prefix}{hf_name}.bias'] = blk['mlp'][vlp_name]['bias']
  return out


def to_hf(params: dict, model: dict) -> dict:
  """transformers' state dict (numpy) of vlp BERT params: BertForMaskedLM's with an MLM head
  (its pooler, if any, is not written: BertForMaskedLM has none), else BertModel's."""
  tx = params['text']
  mlm = 'mlm_head' in params
  base = 'bert.' if mlm else ''
  pos = np.asarray(tx['pos_embed'])
  sd = {f'{base}embeddings.word_embeddings.weight': tx['token_embed'],
        f'{base}embeddings.position_embeddings.weight': pos,
        f'{base}embeddings.token_type_embeddings.weight': np.zeros((2, pos.shape[1]), pos.dtype),
        f'{base}embeddings.LayerNorm.weight': tx['embed_ln']['scale'],
        f'{base}embeddings.LayerNorm.bias': tx['embed_ln']['bias']}
  for i, blk in tx['text_blocks'].items():
    sd.update(_layer_to_hf(blk, f'{base}encoder.layer.{i}.'))
  if mlm:
    h, t = params['mlm_head'], 'cls.predictions.transform.'
    sd.update({f'{t}dense.weight': np.asarray(h['dense']['kernel']).T, f'{t}dense.bias': h['dense']['bias'],
               f'{t}LayerNorm.weight': h['ln']['scale'], f'{t}LayerNorm.bias': h['ln']['bias'],
               'cls.predictions.bias': h['bias']})
  elif 'pooler' in params:
    sd['pooler.dense.weight'] = np.asarray(params['pooler']['kernel']).T
    sd['pooler.dense.bias'] = params['pooler']['bias']
  return {k: np.array(v, np.float32, order='C') for k, v in sd.items()}


def hf_config(model: dict, tokens: dict) -> dict:
  tx, arch = model['text'], model.get('arch', {})
  return {'architectures': ['BertForMaskedLM' if model.get('mlm_head') else 'BertModel'], 'model_type': 'bert',
          'vocab_size': tx['vocab_size'], 'hidden_size': tx['width'], 'num_hidden_layers': tx['depth'],
          'num_attention_heads': tx['num_heads'], 'intermediate_size': tx['mlp_dim'],
          'max_position_embeddings': tx['context_length'], 'type_vocab_size': 2,
          'hidden_act': ACT[arch.get('gelu', 'erf')], 'layer_norm_eps': arch.get('ln_eps', 1e-12),
          'position_embedding_type': 'absolute', 'pad_token_id': tokens.get('pad_id', 0),
          'tie_word_embeddings': True}
