"""`vlp import SRC --out=DIR [--format=open_clip|hf|big_vision]`: another framework's checkpoint as a vlp
export; `vlp export --format=hf`: a vlp model as a transformers directory (a CLIPModel, or a
SiglipModel for the sigmoid head).

An import is an export directory like `vlp export` writes (weights, config, jax.export'ed
encoders), so `vlp.load_pretrained(DIR)` runs it and `--config.init.from=DIR` trains from it
(LiT: lock its image tower with optim.frozen). It keeps its source's token ids (config.json's
`tokens` names the ids that end and start a caption), carries the source's tokenizer.json
when it has one (vlp.interop.hub_tokenizer: encode_text then takes strings) and records the
source's pixel normalisation.
"""
import json

import jax
import numpy as np
import safetensors.numpy
from flax import nnx

from vlp import checkpoint, export, paths, recipes, weights_files
from vlp.interop import big_vision, hf_clip, hf_siglip, hub_tokenizer, open_clip

FORMATS = ('open_clip', 'hf', 'big_vision')


def detect(src: str) -> str:
  if open_clip.is_open_clip(src):
    return 'open_clip'
  if src.endswith('.npz'):
    return 'big_vision'
  if {'CLIPModel', hf_siglip.ARCHITECTURE} & set(hf_clip.architectures(src)):
    return 'hf'
  raise ValueError(f'vlp import: {src} is not an open_clip directory ({open_clip.CONFIG}), a transformers '
                   'directory or a big_vision .npz')


def _check_against_model(flat: dict, model_cfg, src: str):
  """The converted params are exactly the model's: the same names and shapes."""
  abstract = nnx.eval_shape(lambda: recipes.get(model_cfg.name).build(model_cfg))
  want = {k: tuple(x.shape) for k, x in checkpoint.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if want != got:
    diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
    raise ValueError(f'vlp import: {src} does not convert to the model it describes: '
                     + ', '.join(f'{k} {got.get(k)} (model: {want.get(k)})' for k in diff[:5]))


CLIP_NORMALIZATION = {'mean': [0.48145466, 0.4578275, 0.40821073], 'std': [0.26862954, 0.26130258, 0.27577711]}


def _read(src: str, fmt: str):
  """(vlp model config updates, nested params, pixel normalisation, token ids) of a source."""
  if fmt == 'open_clip':
    updates, normalization = open_clip.model_config(src)
    params = open_clip.convert(open_clip.read_state(src), updates)
    vocab = updates['text']['vocab_size']  # CLIP's tokenizer: start and end of text are the last two ids
    return updates, params, normalization, {'eos_id': vocab - 1, 'bos_id': vocab - 2}
  if fmt == 'hf':
    siglip = hf_siglip.ARCHITECTURE in hf_clip.architectures(src)
    converter = hf_siglip if siglip else hf_clip
    updates = converter.model_config(src)
    if not paths.exists(paths.join(src, hf_clip.WEIGHTS)):
      raise ValueError(f'vlp import: {src}: no {hf_clip.WEIGHTS} (torch pickles are not read: nothing is unpickled)')
    params = converter.to_vlp(weights_files.read_file(paths.join(src, hf_clip.WEIGHTS)), updates)
    with paths.open(paths.join(src, hf_clip.CONFIG)) as f:
      text = json.load(f)['text_config']
    normalization = hf_siglip.SIGLIP_NORMALIZATION if siglip else CLIP_NORMALIZATION
    if paths.exists(paths.join(src, 'preprocessor_config.json')):
      with paths.open(paths.join(src, 'preprocessor_config.json')) as f:
        pre = json.load(f)
      normalization = {'mean': pre.get('image_mean', normalization['mean']),
                       'std': pre.get('image_std', normalization['std'])}
    tokens = {'eos_id': text.get('eos_token_id', 2), 'bos_id': text.get('bos_token_id', 1)}
    if siglip:  # SigLIP attends to its padding, so captions are padded with its own pad id
      tokens['pad_id'] = text.get('pad_token_id', 1)
    return updates, params, normalization, tokens
  if fmt == 'big_vision':  # SigLIP's SentencePiece captions end in EOS (id 1), padded with it; no BOS
    flat = big_vision.read(src)
    updates = big_vision.model_config(flat, src)
    return updates, big_vision.to_vlp(flat, updates), big_vision.NORMALIZATION, dict(eos_id=1, bos_id=None, pad_id=1)
  raise ValueError(f'vlp import: --format={fmt}: not one of {", ".join(FORMATS)}')


def run(src: str, out: str, fmt: str | None = None, dtype: str = 'float32') -> str:
  fmt = fmt or detect(src)
  updates, params, normalization, tokens = _read(src, fmt)
  model_cfg = recipes.base_config('align').model
  for key in ('image', 'text', 'arch'):  # a source's tower options over the defaults, key by key
    model_cfg[key].update(updates.pop(key))
  model_cfg.update(updates)
  flat = {k: jax.numpy.asarray(v) for k, v in checkpoint.flatten(params)}
  _check_against_model(flat, model_cfg, src)
  export.write(out, model_cfg, flat, dtype, meta={'step': 0, 'source': src, 'format': fmt,
                                                 'preprocess': normalization, 'tokens': tokens})
  if paths.isdir(src):  # the source's own tokenizer, so encode_text takes strings
    hub_tokenizer.copy_files(src, out)
  return out


def _model_and_params(src: str, step=None, weights='params'):
  """(model config dict, nested numpy params, {'eos_id', 'bos_id'}) of a workdir, export or import."""
  if weights_files.exists(src):
    with paths.open(paths.join(src, export.CONFIG)) as f:
      meta = json.load(f)
    params = checkpoint.unflatten(weights_files.read(src))
    tokens = meta.get('tokens')
    if tokens is None:
      from vlp.data.tokenizer import Tokenizer
      tokens = _token_ids(Tokenizer(paths.join(src, export.TOKENIZER)))
    return meta['model'], params, tokens
  from vlp import tasks
  config, params, _ = export.restore_params(src, step, weights)
  return config.model.to_dict(), jax.tree.map(np.asarray, jax.device_get(params)), _token_ids(
      tasks.tokenizer_for(config))


def _token_ids(tok) -> dict:
  """The ids a caption ends and starts with, as config.json's `tokens` names them."""
  return {'eos_id': tok.sep_id, 'bos_id': tok.cls_id}


def export_hf(src: str, out: str, step=None, weights: str = 'params') -> str:
  """A transformers directory (config.json, model.safetensors) of a vlp model: a CLIPModel, or a
  SiglipModel for the sigmoid head."""
  model, params, tokens = _model_and_params(src, step, weights)
  siglip = model.get('head') == 'sigmoid'
  converter, name = (hf_siglip, hf_siglip.ARCHITECTURE) if siglip else (hf_clip, 'CLIPModel')
  why = converter.exportable(model, params)
  if not siglip and tokens['eos_id'] == 2:  # transformers then pools at the highest token id (CLIP's legacy)
    why.append('its end-of-caption token has id 2, which transformers reads as the legacy argmax pooling')
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
