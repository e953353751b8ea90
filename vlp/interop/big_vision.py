"""big_vision's two-tower checkpoints (SigLIP, LiT, CLIP-style; a `.npz` of '/'-joined names) ->
vlp's ALIGN model, exactly.

big_vision's names (`big_vision/models/vit.py`, `proj/image_text/text_transformer.py`,
`two_towers.py`), an optional leading `params/`, to vlp's:
- `img/embedding/{kernel,bias}` [p, p, 3, W] <-> `image.patch_embed` [(p p 3), W];
  `img/pos_embedding` [1, grid^2, W] <-> `image.pos_embed`; `img/cls` (pool_type 'tok', added
  after the position embeddings, as vlp's) <-> `image.cls`;
- `img/Transformer/encoderblock_{i}` (or `encoderblock` with the blocks stacked on a leading
  axis, `scan=True`): `LayerNorm_0/1` <-> `ln1/2`, `MultiHeadDotProductAttention_0/{query,key,
  value}` [W, heads, head_dim] <-> `attn.qkv`, `out` <-> `attn.out`, `MlpBlock_0/Dense_0/1` <->
  `mlp.fc1/fc2`; `encoder_norm` <-> the encoder's final LayerNorm;
- `img/MAPHead_0` (pool_type 'map') <-> `image.map_head`; `img/head` (when present) <->
  `image_proj`; `txt/Embed_0/embedding`, `txt/pos_embedding`, `txt/Encoder_0`, `txt/head` <->
  the text tower and `text_proj`; `t` (log temperature) <-> `log_scale`; `b` <-> `bias` (SigLIP).
big_vision's text is bidirectional, unmasked and pooled at its last position (pool_type 'last',
its default and SigLIP's), its GELU the tanh approximation, its LayerNorm eps 1e-6.
"""
import numpy as np

from vlp.core import paths

NORMALIZATION = {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}  # value_range(-1, 1)
EOS_ID = 1  # SigLIP's SentencePiece captions end in EOS (id 1) and are padded with it


def read(src: str) -> dict:
  """The arrays of a big_vision .npz by name, without its `params/` prefix (nothing is unpickled)."""
  with paths.open(src, 'rb') as f:
    with np.load(f, allow_pickle=False) as npz:
      flat = {k.removeprefix('params/'): np.asarray(npz[k]) for k in npz.files}
  for needed in ('img/embedding/kernel', 'txt/Embed_0/embedding', 't'):
    if needed not in flat:
      raise ValueError(f'vlp import: {src} is not a big_vision two-tower checkpoint: no {needed!r}')
  return flat


def _blocks(flat, encoder: str):
  """[per block {name under the block: array}] of an encoder, unscanned or scanned."""
  if f'{encoder}/encoderblock_0/LayerNorm_0/scale' in flat:
    depth = 1 + max(int(k[len(encoder) + 14:].split('/')[0]) for k in flat if k.startswith(f'{encoder}/encoderblock_'))
    return [{k[len(f'{encoder}/encoderblock_{i}/'):]: v for k, v in flat.items()
             if k.startswith(f'{encoder}/encoderblock_{i}/')} for i in range(depth)]
  stacked = {k[len(f'{encoder}/encoderblock/'):]: v for k, v in flat.items() if k.startswith(f'{encoder}/encoderblock/')}
  if not stacked:
    raise ValueError(f'vlp import: no encoder blocks under {encoder!r}')
  depth = stacked['LayerNorm_0/scale'].shape[0]
  return [{k: v[i] for k, v in stacked.items()} for i in range(depth)]


def _attention(a, prefix):
  get = lambda n: a[f'{prefix}{n}']
  return {'kernel': get('query/kernel'), 'q_bias': get('query/bias'),
          'k': get('key/kernel'), 'k_bias': get('key/bias'), 'v': get('value/kernel'), 'v_bias': get('value/bias'),
          'out': get('out/kernel'), 'out_bias': get('out/bias')}


def _ln(a, prefix):
  return {'scale': a[f'{prefix}/scale'], 'bias': a[f'{prefix}/bias']}


def _mlp(a, prefix):
  return {fc: {'kernel': a[f'{prefix}/Dense_{i}/kernel'], 'bias': a[f'{prefix}/Dense_{i}/bias']}
          for i, fc in enumerate(('fc1', 'fc2'))}


def _encoder(flat, encoder):
  blocks = {}
  for i, b in enumerate(_blocks(flat, encoder)):
    att = _attention(b, 'MultiHeadDotProductAttention_0/')
    blocks[i] = {'ln1': _ln(b, 'LayerNorm_0'), 'ln2': _ln(b, 'LayerNorm_1'), 'mlp': _mlp(b, 'MlpBlock_0'),
                 'attn': {'qkv': np.stack([att['kernel'], att['k'], att['v']], axis=1),
                          'qkv_bias': np.stack([att['q_bias'], att['k_bias'], att['v_bias']]),
                          'out': att['out'], 'out_bias': att['out_bias']}}
  return {'blocks': blocks, 'ln': _ln(flat, f'{encoder}/encoder_norm')}


def model_config(flat: dict, src: str) -> dict:
  """vlp model config updates of a big_vision two-tower checkpoint, read off its arrays' shapes."""
  p, _, channels, width = flat['img/embedding/kernel'].shape
  grid = int(round(np.sqrt(flat['img/pos_embedding'].shape[1])))
  if channels != 3 or grid * grid != flat['img/pos_embedding'].shape[1]:
    raise ValueError(f'vlp import: {src}: {channels} input channels or a non-square position grid')
  if any(k.startswith('txt/MAPHead_0/') for k in flat):
    raise ValueError(f"vlp import: {src}: text pooled by a MAP head (pool_type 'map'); vlp pools text at a token")
  pool = 'map' if 'img/MAPHead_0/probe' in flat else 'cls' if 'img/cls' in flat else 'gap'
  img_blocks, txt_blocks = _blocks(flat, 'img/Transformer'), _blocks(flat, 'txt/Encoder_0')
  img0, txt0 = img_blocks[0], txt_blocks[0]
  vocab, text_width = flat['txt/Embed_0/embedding'].shape
  if 'txt/head/kernel' not in flat:
    raise ValueError(f'vlp import: {src}: no text head (txt/head); vlp projects the text (model.text_proj)')
  embed_dim = flat['txt/head/kernel'].shape[1]
  image_proj = 'img/head/kernel' in flat
  if not image_proj and embed_dim != width:
    raise ValueError(f'vlp import: {src}: no image head and a text embedding of {embed_dim} against the image '
                     f'width {width}')
  image = dict(image_size=grid * p, patch_size=p, width=width, depth=len(img_blocks),
               num_heads=img0['MultiHeadDotProductAttention_0/query/kernel'].shape[1],
               mlp_dim=img0['MlpBlock_0/Dense_0/kernel'].shape[1], pool=pool, cls_token=pool == 'cls',
               ln_pre=False, patch_bias=True)
  text = dict(vocab_size=vocab, context_length=flat['txt/pos_embedding'].shape[1], width=text_width,
              depth=len(txt_blocks),
              num_heads=txt0['MultiHeadDotProductAttention_0/query/kernel'].shape[1],
              mlp_dim=txt0['MlpBlock_0/Dense_0/kernel'].shape[1], causal=False, pool='last', padding_mask=False,
              pad_id=EOS_ID)
  return dict(image=image, text=text, embed_dim=int(embed_dim), head='sigmoid' if 'b' in flat else 'softmax',
              image_proj=image_proj, proj_bias='txt/head/bias' in flat,
              arch=dict(init='xavier', gelu='tanh', ln_eps=1e-6))


def to_vlp(flat: dict, model: dict) -> dict:
  im = model['image']
  p, width = im['patch_size'], im['width']
  grid = im['image_size'] // p
  image = {'patch_embed': {'kernel': flat['img/embedding/kernel'].reshape(p * p * 3, width),
                           'bias': flat['img/embedding/bias']},
           'pos_embed': flat['img/pos_embedding'].reshape(grid, grid, width),
           'encoder': _encoder(flat, 'img/Transformer')}
  if im['pool'] == 'cls':
    image['cls'] = flat['img/cls'].reshape(width)
  if im['pool'] == 'map':
    h = 'img/MAPHead_0/'
    att = _attention(flat, f'{h}MultiHeadDotProductAttention_0/')
    image['map_head'] = {'probe': flat[f'{h}probe'].reshape(1, width),
                         'attn': {'q': att['kernel'], 'q_bias': att['q_bias'],
                                  'kv': np.stack([att['k'], att['v']], axis=1),
                                  'kv_bias': np.stack([att['k_bias'], att['v_bias']]),
                                  'out': att['out'], 'out_bias': att['out_bias']},
                         'ln': _ln(flat, f'{h}LayerNorm_0'), 'mlp': _mlp(flat, f'{h}MlpBlock_0')}
  text = {'token_embed': flat['txt/Embed_0/embedding'], 'pos_embed': flat['txt/pos_embedding'][0],
          'encoder': _encoder(flat, 'txt/Encoder_0')}
  proj = lambda tower: {'kernel': flat[f'{tower}/head/kernel'],
                        **({'bias': flat[f'{tower}/head/bias']} if model['proj_bias'] else {})}
  params = {'image': image, 'text': text, 'text_proj': proj('txt'),
            'log_scale': np.asarray(flat['t'], np.float32).reshape(())}
  if model['image_proj']:
    params['image_proj'] = proj('img')
  if 'b' in flat:
    params['bias'] = np.asarray(flat['b'], np.float32).reshape(())
  return params
