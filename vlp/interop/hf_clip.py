"""transformers' CLIPModel <-> vlp's ALIGN model (CLIP towers), both ways, exactly.

A transformers directory holds `config.json` (a CLIPConfig: `architectures: ['CLIPModel']`)
and `model.safetensors`. The names, from transformers' to vlp's:
- `vision_model.embeddings.patch_embedding.weight` [W, 3, p, p] <-> `image.patch_embed.kernel`
  [(p p 3), W]; vlp's patch bias (when it has one) folds into the position embeddings;
- `class_embedding` + the CLS position embedding <-> `image.cls`; `pre_layrnorm` <-> `image.ln_pre`;
  `post_layernorm` / `final_layer_norm` <-> the encoders' final LayerNorm;
- per layer, `self_attn.{q,k,v}_proj` <-> `attn.qkv` [W, 3, heads, head_dim], `out_proj` <->
  `attn.out`, `layer_norm1/2` <-> `ln1/2`, `mlp.fc1/fc2` <-> `mlp.fc1/fc2`;
- `visual_projection` / `text_projection` <-> `image_proj` / `text_proj`; `logit_scale` <-> `log_scale`.
The text is pooled as transformers pools it: at the first `eos_token_id` of each row
(`model.text.pool='eos'`, `eos_id`), or at the highest id where `eos_token_id` is 2 (its legacy
rule: `pool='argmax'`), whatever the padding; the export writes the ids that pool the same token.
"""
import json

import numpy as np

from vlp.core import paths
from vlp.interop import clip_layout
from vlp.models import text as text_lib

CONFIG, WEIGHTS = 'config.json', 'model.safetensors'
ACT = {'erf': 'gelu', 'quick': 'quick_gelu', 'tanh': 'gelu_pytorch_tanh'}  # vlp arch.gelu -> hidden_act
# transformers' CLIPTextConfig and SiglipTextConfig defaults, for a config.json that leaves them out
TOKEN_DEFAULTS = {'eos_token_id': 49407, 'bos_token_id': 49406, 'pad_token_id': 1}
LEGACY_EOS = 2  # with this eos_token_id transformers pools a CLIP text at its highest id instead


def architectures(src: str) -> tuple:
  """The `architectures` a transformers directory's config.json names (empty when it has none)."""
  if not paths.exists(paths.join(src, CONFIG)):
    return ()
  with paths.open(paths.join(src, CONFIG)) as f:
    return tuple(json.load(f).get('architectures') or ())


def shared_act_and_eps(src: str, vision: dict, text: dict, default_act: str, default_eps: float):
  """(vlp arch.gelu, ln_eps) of a two-tower config; vlp builds both towers alike."""
  acts = {vision.get('hidden_act', default_act), text.get('hidden_act', default_act)}
  by_act = {a: g for g, a in ACT.items()}
  if len(acts) != 1 or not acts <= set(by_act):
    raise ValueError(f'vlp import: {src}: hidden_act {sorted(acts)} is not one vlp builds ({sorted(by_act)}, '
                     'the same in both towers)')
  eps = {vision.get('layer_norm_eps', default_eps), text.get('layer_norm_eps', default_eps)}
  if len(eps) != 1:
    raise ValueError(f'vlp import: {src}: the towers have different layer_norm_eps {sorted(eps)}')
  return by_act[acts.pop()], float(eps.pop())


def token_ids(src: str, text: dict) -> dict:
  """{'eos_id', 'bos_id', 'pad_id'} of a text_config, transformers' defaults where it has none."""
  ids = {k: text.get(k, v) for k, v in TOKEN_DEFAULTS.items()}
  if not isinstance(ids['eos_token_id'], int):
    raise ValueError(f"vlp import: {src}: text_config.eos_token_id={ids['eos_token_id']!r}: vlp pools the text "
                     'at one end token id')
  return {'eos_id': ids['eos_token_id'], 'bos_id': ids['bos_token_id'],
          'pad_id': ids['pad_token_id'] if isinstance(ids['pad_token_id'], int) else 0}


def _text_pooling(src: str, text: dict) -> dict:
  """vlp's text options that pool a CLIPModel's text where transformers does, and leave its padding
  unmasked as transformers does on ids alone (under causal attention the end token sees none)."""
  ids, vocab = token_ids(src, text), text['vocab_size']
  if ids['eos_id'] == LEGACY_EOS:
    pool = dict(pool='argmax', eos_id=text_lib.NO_EOS)
  elif 0 <= ids['eos_id'] < vocab:
    pool = dict(pool='eos', eos_id=ids['eos_id'])
  else:
    raise ValueError(f"vlp import: {src}: text_config.eos_token_id {ids['eos_id']} is outside the vocabulary "
                     f'({vocab}): transformers would pool every caption at its first token')
  if not 0 <= ids['pad_id'] < vocab:
    raise ValueError(f"vlp import: {src}: text_config.pad_token_id {ids['pad_id']} is outside the vocabulary "
                     f'({vocab})')
  return dict(pool, causal=True, padding_mask=False, pad_id=ids['pad_id'])


# ---- transformers -> vlp

def model_config(src: str) -> dict:
  """vlp model config updates of a CLIPConfig."""
  with paths.open(paths.join(src, CONFIG)) as f:
    cfg = json.load(f)
  v, t = cfg['vision_config'], cfg['text_config']
  gelu, eps = shared_act_and_eps(src, v, t, default_act='quick_gelu', default_eps=1e-5)
  image = dict(image_size=v['image_size'], patch_size=v['patch_size'], width=v['hidden_size'],
               depth=v['num_hidden_layers'], num_heads=v['num_attention_heads'], mlp_dim=v['intermediate_size'],
               pool='cls', ln_pre=True, patch_bias=False)
  text = dict(vocab_size=t['vocab_size'], context_length=t['max_position_embeddings'], width=t['hidden_size'],
              depth=t['num_hidden_layers'], num_heads=t['num_attention_heads'], mlp_dim=t['intermediate_size'],
              **_text_pooling(src, t))
  arch = dict(init='xavier', gelu=gelu, ln_eps=eps)
  return dict(image=image, text=text, embed_dim=cfg['projection_dim'], head='softmax', arch=arch)


def _block_to_vlp(sd, prefix, heads):
  get = lambda n: sd[f'{prefix}{n}']
  width = get('self_attn.q_proj.weight').shape[1]
  hd = width // heads
  qkv = np.stack([get(f'self_attn.{n}_proj.weight').T.reshape(width, heads, hd) for n in 'qkv'], axis=1)
  return {'ln1': {'scale': get('layer_norm1.weight'), 'bias': get('layer_norm1.bias')},
          'ln2': {'scale': get('layer_norm2.weight'), 'bias': get('layer_norm2.bias')},
          'attn': {'qkv': qkv,
                   'qkv_bias': np.stack([get(f'self_attn.{n}_proj.bias').reshape(heads, hd) for n in 'qkv']),
                   'out': get('self_attn.out_proj.weight').T.reshape(heads, hd, width),
                   'out_bias': get('self_attn.out_proj.bias')},
          'mlp': {'fc1': {'kernel': get('mlp.fc1.weight').T, 'bias': get('mlp.fc1.bias')},
                  'fc2': {'kernel': get('mlp.fc2.weight').T, 'bias': get('mlp.fc2.bias')}}}


def encoder_to_vlp(sd, tower, depth, heads, final_ln):
  return {'blocks': {i: _block_to_vlp(sd, f'{tower}.encoder.layers.{i}.', heads) for i in range(depth)},
          'ln': {'scale': sd[f'{tower}.{final_ln}.weight'], 'bias': sd[f'{tower}.{final_ln}.bias']}}


def to_vlp(sd: dict, model: dict) -> dict:
  im, tx = model['image'], model['text']
  emb = 'vision_model.embeddings.'
  image = clip_layout.image_tower(
      sd[f'{emb}patch_embedding.weight'], sd[f'{emb}class_embedding'], sd[f'{emb}position_embedding.weight'],
      (sd['vision_model.pre_layrnorm.weight'], sd['vision_model.pre_layrnorm.bias']),
      encoder_to_vlp(sd, 'vision_model', im['depth'], im['num_heads'], 'post_layernorm'), im)
  text = {'token_embed': sd['text_model.embeddings.token_embedding.weight'],
          'pos_embed': sd['text_model.embeddings.position_embedding.weight'],
          'encoder': encoder_to_vlp(sd, 'text_model', tx['depth'], tx['num_heads'], 'final_layer_norm')}
  return clip_layout.dual_encoder(image, text, sd['visual_projection.weight'].T, sd['text_projection.weight'].T,
                                  sd['logit_scale'])


# ---- vlp -> transformers

DUAL_ENCODER = {'image', 'text', 'image_proj', 'text_proj', 'log_scale'}


def exportable(model: dict, params: dict) -> list[str]:
  """Why a vlp model (config and params) is not a CLIPModel (empty when it is)."""
  im, tx, arch = model['image'], model['text'], model.get('arch', {})
  why = []
  if set(params) != DUAL_ENCODER:
    why.append(f'params beyond a dual encoder with a softmax head: {sorted(set(params) ^ DUAL_ENCODER)}')
  if not im.get('ln_pre'):
    why.append('no ln_pre (CLIP normalises the tokens before its ViT: train with model.image.ln_pre=True)')
  if im.get('pool') != 'cls' or not im.get('cls_token', True):
    why.append(f"image pool {im.get('pool')!r} (CLIP: cls)")
  if model.get('proj_bias'):
    why.append('a bias on the projections (CLIP has none)')
  if not (tx.get('causal') and tx.get('pool') in ('eos', 'argmax')):
    why.append('bidirectional text or [CLS] pooling (CLIP: causal, pooled at EOT)')
  if im['moe'].get('num_experts') or tx['moe'].get('num_experts'):
    why.append('MoE blocks')
  if arch.get('gelu', 'tanh') not in ACT:
    why.append(f"gelu {arch.get('gelu')!r}")
  return why


def _block_to_hf(blk, prefix):
  w = blk['attn']['qkv']  # [W, 3, heads, hd]
  width = w.shape[0]
  out = {}
  for i, n in enumerate('qkv'):
    out[f'{prefix}self_attn.{n}_proj.weight'] = w[:, i].reshape(width, width).T
    out[f'{prefix}self_attn.{n}_proj.bias'] = blk['attn']['qkv_bias'][i].reshape(width)
  out[f'{prefix}self_attn.out_proj.weight'] = blk['attn']['out'].reshape(width, width).T
  out[f'{prefix}self_attn.out_proj.bias'] = blk['attn']['out_bias']
  for vlp_name, hf_name in (('ln1', 'layer_norm1'), ('ln2', 'layer_norm2')):
    out[f'{prefix}{hf_name}.weight'], out[f'{prefix}{hf_name}.bias'] = blk[vlp_name]['scale'], blk[vlp_name]['bias']
  for fc in ('fc1', 'fc2'):
    out[f'{prefix}mlp.{fc}.weight'] = blk['mlp'][fc]['kernel'].T
    out[f'{prefix}mlp.{fc}.bias'] = blk['mlp'][fc]['bias']
  return out


def encoder_to_hf(enc, tower, final_ln):
  out = {}
  for i, blk in enc['blocks'].items():
    out.update(_block_to_hf(blk, f'{tower}.encoder.layers.{i}.'))
  out[f'{tower}.{final_ln}.weight'], out[f'{tower}.{final_ln}.bias'] = enc['ln']['scale'], enc['ln']['bias']
  return out


def to_hf(params: dict, model: dict) -> dict:
  """transformers' CLIPModel state dict (numpy) of vlp ALIGN params (a nested dict)."""
  im = params['image']
  width, p = model['image']['width'], model['image']['patch_size']
  kernel = np.asarray(im['patch_embed']['kernel'])
  pos = np.asarray(im['pos_embed']).reshape(-1, width)
  if 'bias' in im['patch_embed']:  # a bias on every patch token is a part of its position embedding
    pos = pos + np.asarray(im['patch_embed']['bias'])
  sd = {'vision_model.embeddings.patch_embedding.weight': kernel.reshape(p, p, 3, width).transpose(3, 2, 0, 1),
        'vision_model.embeddings.class_embedding': np.asarray(im['cls']),
        'vision_model.embeddings.position_embedding.weight': np.concatenate([np.zeros((1, width), pos.dtype), pos]),
        'vision_model.pre_layrnorm.weight': im['ln_pre']['scale'],
        'vision_model.pre_layrnorm.bias': im['ln_pre']['bias'],
        'text_model.embeddings.token_embedding.weight': params['text']['token_embed'],
        'text_model.embeddings.position_embedding.weight': params['text']['pos_embed'],
        'visual_projection.weight': np.asarray(params['image_proj']['kernel']).T,
        'text_projection.weight': np.asarray(params['text_proj']['kernel']).T,
        'logit_scale': np.asarray(params['log_scale'], np.float32).reshape(())}
  sd.update(encoder_to_hf(im['encoder'], 'vision_model', 'post_layernorm'))
  sd.update(encoder_to_hf(params['text']['encoder'], 'text_model', 'final_layer_norm'))
  return {k: np.array(v, np.float32, order='C') for k, v in sd.items()}  # (ascontiguousarray makes 0-d 1-d)


def eos_token_id(model: dict, tokens: dict) -> int:
  """The eos_token_id that makes transformers' CLIP pool the token vlp's model pools: 2 for the
  highest id (its legacy rule), the model's eos_id, or the end token of vlp's own captions
  (tokens: the ids a caption ends and starts with), which come last before their padding."""
  tx = model['text']
  if tx.get('pool') == 'argmax':
    return LEGACY_EOS
  eos = tx.get('eos_id', text_lib.NO_EOS)
  return tokens['eos_id'] if eos == text_lib.NO_EOS else eos


def tower_configs(model: dict, tokens: dict) -> tuple[dict, dict]:
  """The text_config and vision_config keys CLIP's and SigLIP's transformers configs share;
  tokens: the ids a caption ends and starts with (config.json's `tokens`); the pad id is the
  model's (model.text.pad_id; an export from before it: tokens' pad_id, else 0)."""
  im, tx, arch = model['image'], model['text'], model.get('arch', {})
  act, eps = ACT[arch.get('gelu', 'tanh')], arch.get('ln_eps', 1e-6)
  text = {'vocab_size': tx['vocab_size'], 'hidden_size': tx['width'], 'intermediate_size': tx['mlp_dim'],
          'num_hidden_layers': tx['depth'], 'num_attention_heads': tx['num_heads'],
          'max_position_embeddings': tx['context_length'], 'hidden_act': act, 'layer_norm_eps': eps,
          'eos_token_id': tokens['eos_id'], 'bos_token_id': tokens['bos_id'],
          'pad_token_id': tx.get('pad_id', tokens.get('pad_id', 0))}
  vision = {'hidden_size': im['width'], 'intermediate_size': im['mlp_dim'], 'num_hidden_layers': im['depth'],
            'num_attention_heads': im['num_heads'], 'image_size': im['image_size'], 'patch_size': im['patch_size'],
            'num_channels': 3, 'hidden_act': act, 'layer_norm_eps': eps}
  return text, vision


def hf_config(model: dict, tokens: dict) -> dict:
  text, vision = tower_configs(model, tokens)
  text['eos_token_id'] = eos_token_id(model, tokens)
  projection = {'projection_dim': model['embed_dim']}
  return {'architectures': ['CLIPModel'], 'model_type': 'clip', **projection, 'logit_scale_init_value': 2.6592,
          'text_config': {**text, **projection}, 'vision_config': {**vision, **projection}}
