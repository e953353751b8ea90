"""open_clip checkpoints -> vlp's ALIGN model (CLIP towers), exactly.

Reads the layout open_clip models are published in on the Hugging Face hub: a
directory with `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...})
and `open_clip_model.safetensors`; its torch pickle (`open_clip_pytorch_model.bin`)
only with --allow-pickle, through vlp.interop.torch_pickle's restricted reader.
Covered: ViT image towers with a class token, learnt position embeddings and
`ln_pre`; causal text Transformers pooled as open_clip pools them: at the highest id
(its 'argmax' pooling: CLIP's EOT) or at the first `eos_id` (its 'eos'), padding unmasked
as open_clip's causal text leaves it; projections without bias; quick_gelu or exact GELU.
Anything else (ResNet towers, LayerScale, attentional pooling, transformers text
towers) is refused in one line naming the key.

The mapping, from open_clip's names to vlp's:
- `conv1.weight` [W, 3, p, p] -> `patch_embed.kernel` [(p p 3), W], no bias;
- the class embedding plus the CLS position embedding -> `cls` (both are constants
  added before `ln_pre`, so their sum is the same model);
- `in_proj_weight` [3W, W] -> `qkv` [W, 3, heads, head_dim]; `out_proj.weight`
  [W, W] -> `out` [heads, head_dim, W];
- `ln_post` / `ln_final` -> the encoders' final LayerNorm (vlp normalises every token,
  then pools: the same pooled feature).
"""
import json

from vlp.core import paths, weights_files
from vlp.interop import clip_layout, torch_pickle
from vlp.models import text as text_lib

CONFIG, WEIGHTS = 'open_clip_config.json', 'open_clip_model.safetensors'
PICKLES = ('open_clip_pytorch_model.bin', 'pytorch_model.bin')
# keys of open_clip's tower configs that would make another architecture than vlp's, with the
# values vlp's towers match (the first is open_clip's default, taken when the key is absent)
_VISION_AS_VLP = {'ls_init_value': (None,), 'attentional_pool': (False,), 'pool_type': ('tok',),
                  'final_ln_after_pool': (False,), 'pos_embed_type': ('learnable',), 'no_ln_pre': (False,),
                  'timm_model_name': (None,), 'input_patchnorm': (False,), 'act_kwargs': (None,),
                  'norm_kwargs': (None,)}
_TEXT_AS_VLP = {'ls_init_value': (None,), 'hf_model_name': (None,), 'embed_cls': (False,),
                'pool_type': ('argmax', 'eos'), 'proj_bias': (False,), 'no_causal_mask': (False,),
                'proj_type': ('linear', None), 'act_kwargs': (None,), 'norm_kwargs': (None,)}


def is_open_clip(src: str) -> bool:
  return paths.exists(paths.join(src, CONFIG))


def _refuse(what: str):
  raise ValueError(f'vlp import: {what}')


def model_config(src: str) -> tuple[dict, dict]:
  """(vlp model config updates, preprocess {'mean', 'std'}) of an open_clip model config."""
  with paths.open(paths.join(src, CONFIG)) as f:
    meta = json.load(f)
  cfg, pre = meta.get('model_cfg', meta), meta.get('preprocess_cfg', {})
  v, t = cfg['vision_cfg'], cfg['text_cfg']
  if not isinstance(v.get('layers'), int):
    _refuse(f'{src}: vision_cfg.layers={v.get("layers")!r} is a ResNet tower; vlp imports ViT towers')
  for section, name, as_vlp in ((v, 'vision_cfg', _VISION_AS_VLP), (t, 'text_cfg', _TEXT_AS_VLP)):
    for key, values in as_vlp.items():
      if section.get(key, values[0]) not in values:
        _refuse(f'{src}: {name}.{key}={section[key]!r} is not supported (vlp builds {key}={values[0]!r})')
  size = v.get('image_size', 224)
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      _refuse(f'{src}: vision_cfg.image_size={size!r} is not square')
    size = size[0]
  width, text_width = v.get('width', 768), t.get('width', 512)
  head_width = v.get('head_width', 64)
  image = dict(image_size=size, patch_size=v.get('patch_size', 16), width=width, depth=v['layers'],
               num_heads=width // head_width, mlp_dim=int(width * v.get('mlp_ratio', 4.0)), pool='cls',
               ln_pre=True, patch_bias=False)
  vocab = t.get('vocab_size', 49408)
  text = dict(vocab_size=vocab, context_length=t.get('context_length', 77), width=text_width,
              depth=t.get('layers', 12), num_heads=t.get('heads', 8), mlp_dim=int(text_width * t.get('mlp_ratio', 4.0)),
              causal=True, padding_mask=False, **_text_pooling(src, t, vocab))
  arch = dict(init='xavier', gelu='quick' if cfg.get('quick_gelu') else 'erf', ln_eps=1e-5)
  norm = {'mean': list(pre.get('mean', (0.48145466, 0.4578275, 0.40821073))),  # OpenAI CLIP's
          'std': list(pre.get('std', (0.26862954, 0.26130258, 0.27577711)))}
  return dict(image=image, text=text, embed_dim=cfg['embed_dim'], head='softmax', arch=arch), norm


def _text_pooling(src: str, t: dict, vocab: int) -> dict:
  """vlp's pool, eos_id and pad_id of open_clip's text_cfg (pool_type 'argmax' or 'eos')."""
  pool = t.get('pool_type', 'argmax')
  ids = {'pad_id': t.get('pad_id', 0), **({'eos_id': t.get('eos_id', 2)} if pool == 'eos' else {})}
  for key, value in ids.items():
    if not 0 <= value < vocab:
      _refuse(f'{src}: text_cfg.{key}={value} is outside the vocabulary ({vocab})')
  return dict(pool=pool, eos_id=ids.get('eos_id', text_lib.NO_EOS), pad_id=ids['pad_id'])


def read_state(src: str, allow_pickle: bool = False) -> dict:
  """open_clip's state dict as numpy arrays: its safetensors, else (allow_pickle) its torch pickle."""
  path = paths.join(src, WEIGHTS)
  if not paths.exists(path):
    pickled = [p for p in PICKLES if paths.exists(paths.join(src, p))]
    if not pickled:
      _refuse(f'{src}: no {WEIGHTS}')
    return torch_pickle.read_allowed(paths.join(src, pickled[0]), allow_pickle, WEIGHTS)
  return weights_files.read_file(path)


def _block(sd, prefix, heads):
  """One residual block of open_clip -> vlp's Block params."""
  w = sd[f'{prefix}attn.in_proj_weight']
  width = w.shape[1]
  hd = width // heads
  ln = lambda n: {'scale': sd[f'{prefix}{n}.weight'], 'bias': sd[f'{prefix}{n}.bias']}
  return {
      'ln1': ln('ln_1'), 'ln2': ln('ln_2'),
      'attn': {'qkv': w.reshape(3, heads, hd, width).transpose(3, 0, 1, 2),
               'qkv_bias': sd[f'{prefix}attn.in_proj_bias'].reshape(3, heads, hd),
               'out': sd[f'{prefix}attn.out_proj.weight'].T.reshape(heads, hd, width),
               'out_bias': sd[f'{prefix}attn.out_proj.bias']},
      'mlp': {'fc1': {'kernel': sd[f'{prefix}mlp.c_fc.weight'].T, 'bias': sd[f'{prefix}mlp.c_fc.bias']},
              'fc2': {'kernel': sd[f'{prefix}mlp.c_proj.weight'].T, 'bias': sd[f'{prefix}mlp.c_proj.bias']}},
  }


def _encoder(sd, prefix, depth, heads, final_ln):
  return {'blocks': {i: _block(sd, f'{prefix}transformer.resblocks.{i}.', heads) for i in range(depth)},
          'ln': {'scale': sd[f'{final_ln}.weight'], 'bias': sd[f'{final_ln}.bias']}}


def convert(sd: dict, model: dict) -> dict:
  """vlp's ALIGN params (a nested dict) of an open_clip state dict."""
  im, tx = model['image'], model['text']
  image = clip_layout.image_tower(
      sd['visual.conv1.weight'], sd['visual.class_embedding'], sd['visual.positional_embedding'],
      (sd['visual.ln_pre.weight'], sd['visual.ln_pre.bias']),
      _encoder(sd, 'visual.', im['depth'], im['num_heads'], 'visual.ln_post'), im)
  text = {'token_embed': sd['token_embedding.weight'], 'pos_embed': sd['positional_embedding'],
          'encoder': _encoder(sd, '', tx['depth'], tx['num_heads'], 'ln_final')}
  proj = sd['text_projection'] if 'text_projection' in sd else sd['text_projection.weight'].T
  return clip_layout.dual_encoder(image, text, sd['visual.proj'], proj, sd['logit_scale'])

