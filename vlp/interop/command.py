"""`vlp import SRC --out=DIR [--format=open_clip|hf|big_vision]`: another framework's checkpoint as a vlp
export; `vlp export --format=hf`: a vlp model as a transformers directory (a CLIPModel, a
SiglipModel for the sigmoid head, a BertModel or BertForMaskedLM for a BERT import).

An import is an export directory like `vlp export` writes (weights, config, jax.export'ed
encoders), so `vlp.load_pretrained(DIR)` runs it and `--config.init.from=DIR` trains from it
(LiT: lock its image tower with optim.frozen). It keeps its source's token ids (config.json's
`tokens` names the ids that end and start a caption), carries the source's tokenizer.json
when it has one (vlp.data.hub_tokenizer: encode_text then takes strings) and records the
source's pixel normalisation.
"""
import json

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from vlp import export, recipes
from vlp.core import paths, trees, weights_files
from vlp.data import hub_tokenizer
from vlp.interop import big_vision, hf_bert, hf_clip, hf_siglip, open_clip, torch_pickle
from vlp.models import stacks, text as text_lib

FORMATS = ('open_clip', 'hf', 'big_vision')
HF_PICKLE = 'pytorch_model.bin'  # transformers' torch pickle, read only with --allow-pickle


def detect(src: str) -> str:
  if open_clip.is_open_clip(src):
    return 'open_clip'
  if src.endswith('.npz'):
    return 'big_vision'
  if {'CLIPModel', hf_siglip.ARCHITECTURE, *hf_bert.ARCHITECTURES} & set(hf_clip.architectures(src)):
    return 'hf'
  raise ValueError(f'vlp import: {src} is not an open_clip directory ({open_clip.CONFIG}), a transformers '
                   'directory or a big_vision .npz')


def _check_against_model(flat: dict, model_cfg, src: str):
  """The converted params are exactly the model's: the same names and shapes."""
  abstract = nnx.eval_shape(lambda: recipes.get(model_cfg.name).build(model_cfg))
  want = {k: tuple(x.shape) for k, x in trees.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if want != got:
    diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
    raise ValueError(f'vlp import: {src} does not convert to the model it describes: '
                     + ', '.join(f'{k} {got.get(k)} (model: {want.get(k)})' for k in diff[:5]))


CLIP_NORMALIZATION = {'mean': [0.48145466, 0.4578275, 0.40821073], 'std': [0.26862954, 0.26130258, 0.27577711]}


def _read(src: str, fmt: str, allow_pickle: bool = False):
  """(recipe, vlp model config updates, nested params, pixel normalisation, token ids) of a source."""
  if fmt == 'open_clip':
    updates, normalization = open_clip.model_config(src)
    params = open_clip.convert(open_clip.read_state(src, allow_pickle), updates)
    text = updates['text']  # CLIP's tokenizer: start and end of text are the last two ids
    eos = text['vocab_size'] - 1 if text['eos_id'] == text_lib.NO_EOS else text['eos_id']
    return 'align', updates, params, normalization, {'eos_id': eos, 'bos_id': text['vocab_size'] - 2,
                                                      'pad_id': text['pad_id']}
  if fmt == 'hf':
    return _read_hf(src, allow_pickle)
  if fmt == 'big_vision':  # SigLIP's SentencePiece captions end in EOS, padded with it; no BOS
    flat = big_vision.read(src)
    updates = big_vision.model_config(flat, src)
    return ('align', updates, big_vision.to_vlp(flat, updates), big_vision.NORMALIZATION,
            dict(eos_id=big_vision.EOS_ID, bos_id=None, pad_id=big_vision.EOS_ID))
  raise ValueError(f'vlp import: --format={fmt}: not one of {", ".join(FORMATS)}')


def _hf_weights(src: str, allow_pickle: bool) -> dict:
  """model.safetensors, else (allow_pickle) pytorch_model.bin through the restricted reader."""
  if paths.exists(paths.join(src, hf_clip.WEIGHTS)):
    return weights_files.read_file(paths.join(src, hf_clip.WEIGHTS))
  if paths.exists(paths.join(src, HF_PICKLE)):
    return torch_pickle.read_allowed(paths.join(src, HF_PICKLE), allow_pickle, hf_clip.WEIGHTS)
  raise ValueError(f'vlp import: {src}: no {hf_clip.WEIGHTS}')


def _read_hf(src: str, allow_pickle: bool):
  architectures = set(hf_clip.architectures(src))
  if architectures & set(hf_bert.ARCHITECTURES):  # a text encoder: no pixels; ids from its own tokenizer
    updates, sd = hf_bert.model_config(src), hf_bert.canonical(_hf_weights(src, allow_pickle))
    updates.update(hf_bert.heads(sd))
    tokenizer = paths.join(src, hub_tokenizer.FILE)
    tokens = hub_tokenizer.special_ids(tokenizer) if paths.exists(tokenizer) else {'pad_id': 0}
    return 'bert', updates, hf_bert.to_vlp(sd, updates), None, tokens
  siglip = hf_siglip.ARCHITECTURE in architectures
  converter = hf_siglip if siglip else hf_clip
  updates = converter.model_config(src)
  params = converter.to_vlp(_hf_weights(src, allow_pickle), updates)
  with paths.open(paths.join(src, hf_clip.CONFIG)) as f:
    text = json.load(f)['text_config']
  normalization = hf_siglip.SIGLIP_NORMALIZATION if siglip else CLIP_NORMALIZATION
  if paths.exists(paths.join(src, 'preprocessor_config.json')):
    with paths.open(paths.join(src, 'preprocessor_config.json')) as f:
      pre = json.load(f)
    normalization = {'mean': pre.get('image_mean', normalization['mean']),
                     'std': pre.get('image_std', normalization['std'])}
  tokens = hf_clip.token_ids(src, text)
  if siglip:  # SigLIP attends to its padding, so captions are padded with its own pad id
    tokens.update(hub_tokenizer.siglip_options(src))
  else:  # captions zero-padded: causal attention keeps padding from the end token they are pooled at
    tokens['pad_id'] = 0
    if updates['text']['pool'] == 'argmax':  # the legacy eos_token_id 2: CLIP's end token is its highest id
      tokens['eos_id'] = updates['text']['vocab_size'] - 1
  return 'align', updates, params, normalization, tokens


def run(src: str, out: str, fmt: str | None = None, dtype: str = 'float32', tokenizer: str = '',
        allow_pickle: bool = False) -> str:
  """Imports src into out; `tokenizer`: a SentencePiece model the source's captions were read
  with, where the source does not ship one (big_vision: its `tok` model), taken as it is;
  `allow_pickle`: a source whose weights are only a torch pickle is read by torch_pickle (a warning)."""
  fmt = fmt or detect(src)
  recipe, updates, params, normalization, tokens = _read(src, fmt, allow_pickle)
  model_cfg = recipes.base_config(recipe).model
  for key in ('image', 'text', 'arch'):  # a source's tower options over the defaults, key by key
    if key in updates:
      model_cfg[key].update(updates.pop(key))
  model_cfg.update(updates)
  flat = {k: jax.numpy.asarray(v) for k, v in trees.flatten(params)}
  _check_against_model(flat, model_cfg, src)
  export.write(out, model_cfg, flat, dtype, meta={'step': 0, 'source': src, 'format': fmt,
                                                 'preprocess': normalization, 'tokens': tokens})
  if paths.isdir(src):  # the source's own tokenizer, so encode_text takes strings
    hub_tokenizer.copy_files(src, out)
  if tokenizer:
    paths.copy(tokenizer, paths.join(out, hub_tokenizer.SPIECE))
  return out


def _model_and_params(src: str, step=None, weights='params'):
  """(model config dict, nested numpy params named per block, {'eos_id', 'bos_id'}) of a workdir, export
  or import."""
  if weights_files.exists(src):
    with paths.open(paths.join(src, export.CONFIG)) as f:
      meta = json.load(f)
    params = trees.unflatten(weights_files.read(src))
    tokens = meta.get('tokens')
    if tokens is None:
      from vlp.data.tokenizer import Tokenizer
      tokens = _token_ids(Tokenizer(paths.join(src, export.TOKENIZER)))
    return meta['model'], params, tokens
  from vlp.data import tokenizer as tokenizer_lib
  from vlp.workdir import checkpoints
  config, params, _ = checkpoints.restore_params(src, step, weights)
  # a scanned run stores its block stacks stacked (vlp.models.stacks); the converters name blocks one by one
  flat = stacks.per_block({k: np.asarray(v) for k, v in trees.flatten(jax.device_get(params))})
  return config.model.to_dict(), trees.unflatten(flat), _token_ids(tokenizer_lib.for_config(config))


def _token_ids(tok) -> dict:
  """The ids a caption ends and starts with, as config.json's `tokens` names them."""
  return {'eos_id': tok.sep_id, 'bos_id': tok.cls_id}


def _converter(model: dict, params: dict, tokens: dict):
  """(converter module, the transformers class it writes, why the model is not one: empty when it is)."""
  if hf_bert.claims(model):
    converter, name = hf_bert, 'BertForMaskedLM' if model.get('mlm_head') else 'BertModel'
  else:
    beyond = sorted(set(params) - hf_clip.DUAL_ENCODER - hf_siglip.SIGLIP_PARAMS)
    if beyond:  # ALBEF's fusion stack and heads, IMP's shared encoder: no transformers class
      return None, 'model transformers has a class for', [
          f"the {model.get('name')} model's params go beyond a dual encoder's ({', '.join(beyond)})"]
    siglip = model.get('head') == 'sigmoid'
    converter, name = (hf_siglip, hf_siglip.ARCHITECTURE) if siglip else (hf_clip, 'CLIPModel')
  why = converter.exportable(model, params)
  legacy = hf_clip.eos_token_id(model, tokens) == hf_clip.LEGACY_EOS and model['text'].get('pool') != 'argmax'
  if converter is hf_clip and legacy:
    why.append('its end-of-caption token has id 2, which transformers reads as the legacy argmax pooling')
  return converter, name, why


def export_hf(src: str, out: str, step=None, weights: str = 'params') -> str:
  """A transformers directory (config.json, model.safetensors) of a vlp model: a CLIPModel, a
  SiglipModel for the sigmoid head, a BertModel or BertForMaskedLM for a BERT import."""
  model, params, tokens = _model_and_params(src, step, weights)
  converter, name, why = _converter(model, params, tokens)
  if why:
    raise ValueError(f'vlp export --format=hf: {src} is not a {name}: ' + '; '.join(why))
  paths.makedirs(out)
  with paths.open(paths.join(out, hf_clip.CONFIG), 'w') as f:
    json.dump(converter.hf_config(model, tokens), f, indent=2)
  paths.write_atomic(paths.join(out, hf_clip.WEIGHTS),
                     safetensors.numpy.save(converter.to_hf(params, model), metadata={'format': 'pt'}))
  if paths.isdir(src):  # an import's tokenizer travels on; vlp's own SentencePiece model does not (yet)
    hub_tokenizer.copy_files(src, out)
  return out
