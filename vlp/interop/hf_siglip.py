"""transformers' SiglipModel <-> vlp's ALIGN model with SigLIP's towers, both ways, exactly.

SigLIP's layout in vlp's options: a ViT without a CLS token pooled by a MAP head
(`image.cls_token=False`, `image.pool='map'`) and no image projection (`image_proj=False`); a
bidirectional text tower pooled at its last position with padding attended to
(`text.pool='last'`, `text.padding_mask=False`) and a projection with a bias
(`proj_bias=True`); the sigmoid head's learnt scale and bias. The encoder blocks are named
as CLIP's (hf_clip.encoder_to_vlp); the rest, from transformers' to vlp's:
- `vision_model.embeddings.patch_embedding.{weight,bias}` <-> `image.patch_embed.{kernel,bias}`;
  `position_embedding.weight` [grid^2, W] <-> `image.pos_embed` [grid, grid, W];
- `vision_model.head.probe` [1, 1, W] <-> `image.map_head.probe` [1, W]; its
  `attention.in_proj_{weight,bias}` (q, k, v stacked) <-> `attn.q`/`attn.kv` and their biases,
  `attention.out_proj` <-> `attn.out`, `layernorm` <-> `ln`, `mlp.fc1/fc2` <-> `mlp.fc1/fc2`;
- `text_model.head` <-> `text_proj`; `logit_scale` [1] / `logit_bias` [1] <-> `log_scale` / `bias`.
"""
import json

import numpy as np

from vlp.core import paths
from vlp.interop import hf_clip

CONFIG, WEIGHTS = hf_clip.CONFIG, hf_clip.WEIGHTS
ARCHITECTURE = 'SiglipModel'
SIGLIP_NORMALIZATION = {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}  # SiglipImageProcessor's


# ---- transformers -> vlp

def model_config(src: str) -> dict:
  """vlp model config updates of a SiglipConfig."""
  with paths.open(paths.join(src, CONFIG)) as f:
    cfg = json.load(f)
  v, t = cfg['vision_config'], cfg['text_config']
  gelu, eps = hf_clip.shared_act_and_eps(src, v, t, default_act='gelu_pytorch_tanh', default_eps=1e-6)
  if not v.get('vision_use_head', True):
    raise ValueError(f'vlp import: {src}: a SiglipModel without its vision head (vision_use_head=False) has no '
                     'image embedding')
  width = v['hidden_size']
  if t.get('projection_size', t['hidden_size']) != width:
    raise ValueError(f"vlp import: {src}: text projection_size {t.get('projection_size')} is not the vision "
                     f'width {width} (SigLIP compares the pooled image feature with the projected text)')
  image = dict(image_size=v['image_size'], patch_size=v['patch_size'], width=width, depth=v['num_hidden_layers'],
               num_heads=v['num_attention_heads'], mlp_dim=v['intermediate_size'], pool='map', cls_token=False,
               ln_pre=False, patch_bias=True)
  text = dict(vocab_size=t['vocab_size'], context_length=t['max_position_embeddings'], width=t['hidden_size'],
              depth=t['num_hidden_layers'], num_heads=t['num_attention_heads'], mlp_dim=t['intermediate_size'],
              causal=False, pool='last', padding_mask=False, pad_id=hf_clip.token_ids(src, t)['pad_id'])
  return dict(image=image, text=text, embed_dim=width, head='sigmoid', image_proj=False, proj_bias=True,
              arch=dict(init='xavier', gelu=gelu, ln_eps=eps))


def _map_head_to_vlp(sd, prefix, heads):
  get = lambda n: sd[prefix + n]
  width = get('probe').shape[-1]
  hd = width // heads
  w, b = get('attention.in_proj_weight'), get('attention.in_proj_bias')  # [3W, W], [3W]: q, k, v
  q, k, v = (w[i * width:(i + 1) * width].T.reshape(width, heads, hd) for i in range(3))
  qb, kb, vb = (b[i * width:(i + 1) * width].reshape(heads, hd) for i in range(3))
  return {'probe': get('probe').reshape(1, width),
          'attn': {'q': q, 'q_bias': qb, 'kv': np.stack([k, v], axis=1), 'kv_bias': np.stack([kb, vb]),
                   'out': get('attention.out_proj.weight').T.reshape(heads, hd, width),
                   'out_bias': get('attention.out_proj.bias')},
          'ln': {'scale': get('layernorm.weight'), 'bias': get('layernorm.bias')},
          'mlp': {fc: {'kernel': get(f'mlp.{fc}.weight').T, 'bias': get(f'mlp.{fc}.bias')} for fc in ('fc1', 'fc2')}}


def to_vlp(sd: dict, model: dict) -> dict:
  im, tx = model['image'], model['text']
  emb, grid = 'vision_model.embeddings.', im['image_size'] // im['patch_size']
  conv, width, p = sd[f'{emb}patch_embedding.weight'], im['width'], im['patch_size']
  image = {'patch_embed': {'kernel': conv.transpose(2, 3, 1, 0).reshape(p * p * 3, width),
                           'bias': sd[f'{emb}patch_embedding.bias']},
           'pos_embed': sd[f'{emb}position_embedding.weight'].reshape(grid, grid, width),
           'encoder': hf_clip.encoder_to_vlp(sd, 'vision_model', im['depth'], im['num_heads'], 'post_layernorm'),
           'map_head': _map_head_to_vlp(sd, 'vision_model.head.', im['num_heads'])}
  text = {'token_embed': sd['text_model.embeddings.token_embedding.weight'],
          'pos_embed': sd['text_model.embeddings.position_embedding.weight'],
          'encoder': hf_clip.encoder_to_vlp(sd, 'text_model', tx['depth'], tx['num_heads'], 'final_layer_norm')}
  return {'image': image, 'text': text,
          'text_proj': {'kernel': sd['text_model.head.weight'].T, 'bias': sd['text_model.head.bias']},
          'log_scale': np.asarray(sd['logit_scale'], np.float32).reshape(()),
          'bias': np.asarray(sd['logit_bias'], np.float32).reshape(())}


# ---- vlp -> transformers

SIGLIP_PARAMS = {'image', 'text', 'text_proj', 'log_scale', 'bias'}


def exportable(model: dict, params: dict) -> list[str]:
  """Why a vlp model (config and params) is not a SiglipModel (empty when it is)."""
  im, tx, arch = model['image'], model['text'], model.get('arch', {})
  why = []
  if set(params) != SIGLIP_PARAMS:
    why.append(f'params beyond SigLIP\'s (no image projection, a sigmoid head): '
               f'{sorted(set(params) ^ SIGLIP_PARAMS)} (train with model.image_proj=False)')
  if (im.get('pool'), im.get('cls_token', True), im.get('ln_pre')) != ('map', False, False):
    why.append('the image tower is not a ViT without a CLS token pooled by a MAP head (model.image.pool=map, '
               'cls_token=False, ln_pre=False)')
  if not im.get('patch_bias', True):
    why.append('no patch bias')
  if (tx.get('causal'), tx.get('pool'), tx.get('padding_mask', True)) != (False, 'last', False):
    why.append('the text tower is not bidirectional, pooled at its last position with padding attended '
               '(model.text.causal=False, pool=last, padding_mask=False)')
  if not model.get('proj_bias'):
    why.append('no bias on the text projection (model.proj_bias=True)')
  if im['moe'].get('num_experts') or tx['moe'].get('num_experts'):
    why.append('MoE blocks')
  if arch.get('gelu', 'tanh') not in hf_clip.ACT:
    why.append(f"gelu {arch.get('gelu')!r}")
  return why


def _map_head_to_hf(head, prefix):
  a = head['attn']
  width = a['q'].shape[0]
  q, kv = np.asarray(a['q']).reshape(width, width), np.asarray(a['kv'])
  in_proj = np.concatenate([q.T, kv[:, 0].reshape(width, width).T, kv[:, 1].reshape(width, width).T])
  in_bias = np.concatenate([np.asarray(a['q_bias']).reshape(width), np.asarray(a['kv_bias']).reshape(2 * width)])
  out = {f'{prefix}probe': np.asarray(head['probe']).reshape(1, 1, width),
         f'{prefix}attention.in_proj_weight': in_proj, f'{prefix}attention.in_proj_bias': in_bias,
         f'{prefix}attention.out_proj.weight': np.asarray(a['out']).reshape(width, width).T,
         f'{prefix}attention.out_proj.bias': a['out_bias'],
         f'{prefix}layernorm.weight': head['ln']['scale'], f'{prefix}layernorm.bias': head['ln']['bias']}
  for fc in ('fc1', 'fc2'):
    out[f'{prefix}mlp.{fc}.weight'] = np.asarray(head['mlp'][fc]['kernel']).T
    out[f'{prefix}mlp.{fc}.bias'] = head['mlp'][fc]['bias']
  return out


def to_hf(params: dict, model: dict) -> dict:
  """transformers' SiglipModel state dict (numpy) of vlp params in SigLIP's layout."""
  im = params['image']
  width, p = model['image']['width'], model['image']['patch_size']
  kernel = np.asarray(im['patch_embed']['kernel'])
  emb = 'vision_model.embeddings.'
  sd = {f'{emb}patch_embedding.weight': kernel.reshape(p, p, 3, width).transpose(3, 2, 0, 1),
        f'{emb}patch_embedding.bias': im['patch_embed']['bias'],
        f'{emb}position_embedding.weight': np.asarray(im['pos_embed']).reshape(-1, width),
        'text_model.embeddings.token_embedding.weight': params['text']['token_embed'],
        'text_model.embeddings.position_embedding.weight': params['text']['pos_embed'],
        'text_model.head.weight': np.asarray(params['text_proj']['kernel']).T,
        'text_model.head.bias': params['text_proj']['bias'],
        'logit_scale': np.asarray(params['log_scale'], np.float32).reshape(1),
        'logit_bias': np.asarray(params['bias'], np.float32).reshape(1)}
  sd.update(_map_head_to_hf(im['map_head'], 'vision_model.head.'))
  sd.update(hf_clip.encoder_to_hf(im['encoder'], 'vision_model', 'post_layernorm'))
  sd.update(hf_clip.encoder_to_hf(params['text']['encoder'], 'text_model', 'final_layer_norm'))
  return {k: np.array(v, np.float32, order='C') for k, v in sd.items()}


def hf_config(model: dict, tokens: dict) -> dict:
  text, vision = hf_clip.tower_configs(model, tokens)
  return {'architectures': [ARCHITECTURE], 'model_type': 'siglip',
          'text_config': {**text, 'projection_size': model['embed_dim']},
          'vision_config': {**vision, 'vision_use_head': True}}
