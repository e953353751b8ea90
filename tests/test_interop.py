"""`vlp import` of open_clip checkpoints and transformers CLIPModel directories, `vlp export
--format=hf`: small models built on the spot with random weights (in the open_clip environment),
imported or exported, and run on both sides; embeddings equal in fp32. Then LiT from an import:
its image tower locked, a text tower trained from scratch."""
import json
import os
import subprocess

import numpy as np
import pytest
import safetensors.numpy
from conftest import tiny_config, transformers_python

from vlp import cli, pretrained
from vlp.bench import compare
from vlp.core import trees, weights_files
from vlp.models import layers
from vlp.workdir import checkpoints

REF = os.path.join(os.path.dirname(__file__), 'open_clip_model_ref.py')
VOCAB, CONTEXT = 1000, 16


def _clip_config(quick_gelu):
  return {'embed_dim': 32, 'quick_gelu': quick_gelu,
          'vision_cfg': {'image_size': 16, 'patch_size': 4, 'width': 64, 'head_width': 32, 'layers': 2},
          'text_cfg': {'context_length': CONTEXT, 'vocab_size': VOCAB, 'width': 48, 'heads': 2, 'layers': 2}}


def _inputs(rng):
  images = rng.normal(size=(5, 16, 16, 3)).astype(np.float32)  # already normalised, NHWC for vlp
  tokens = np.zeros((5, CONTEXT), np.int32)
  for i, n in enumerate((3, 7, 14, 1, 10)):  # SOT, words, EOT (the highest id, as CLIP's tokenizer), zeros
    tokens[i, 0], tokens[i, 1:n + 1], tokens[i, n + 1] = VOCAB - 2, rng.integers(1, VOCAB - 2, n), VOCAB - 1
  return images, tokens


def _open_clip_dir(tmp_path, quick_gelu):
  """An open_clip hub directory of a random small CLIP, and open_clip's own embeddings of inputs."""
  try:
    python = compare.bench_python(None)
  except compare.ReferenceEnvError as e:
    pytest.skip(str(e))
  images, tokens = _inputs(np.random.default_rng(0))
  (tmp_path / 'cfg.json').write_text(json.dumps(_clip_config(quick_gelu)))
  np.savez(tmp_path / 'in.npz', image_nchw=images.transpose(0, 3, 1, 2), tokens=tokens)
  src = tmp_path / 'open_clip'
  proc = subprocess.run([python, REF, '--config', str(tmp_path / 'cfg.json'), '--inputs', str(tmp_path / 'in.npz'),
                         '--out', str(src)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  state = dict(np.load(src / 'state_dict.npz'))
  os.remove(src / 'state_dict.npz')
  safetensors.numpy.save_file(state, str(src / 'open_clip_model.safetensors'))  # as the hub ships them
  return src, images, tokens, dict(np.load(src / 'embeddings.npz'))


@pytest.mark.parametrize('quick_gelu', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_open_clip_import_gives_open_clips_embeddings(tmp_path, quick_gelu):
  src, images, tokens, want = _open_clip_dir(tmp_path, quick_gelu)
  out = tmp_path / 'imported'
  assert cli.main(['import', str(src), f'--out={out}']) == 0
  meta = json.loads((out / 'config.json').read_text())
  assert meta['format'] == 'open_clip' and meta['model']['arch']['gelu'] == ('quick' if quick_gelu else 'erf')
  assert meta['model']['image']['ln_pre'] and not meta['model']['image']['patch_bias']
  enc = pretrained.load(str(out))
  image_diff = np.abs(enc.encode_image(images) - want['image']).max()
  text_diff = np.abs(enc.encode_text(tokens) - want['text']).max()
  print(f'open_clip parity (quick_gelu={quick_gelu}): image {image_diff:.2e}, text {text_diff:.2e}')
  assert image_diff <= 1e-4 and text_diff <= 1e-4, (image_diff, text_diff)
  # the learnt temperature came along; pixels are normalised by the source's mean and std
  flat = safetensors.numpy.load_file(str(out / 'model.safetensors'))
  assert float(flat['log_scale']) == pytest.approx(float(want['logit_scale'].reshape(())), rel=1e-6)  # both log
  pixels = np.full((1, 16, 16, 3), 255, np.uint8)
  np.testing.assert_allclose(enc.preprocess(pixels)[0, 0, 0], (1 - np.array([0.5, 0.4, 0.3])) / [0.2, 0.25, 0.3],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='give encode_text int token ids'):
    enc.encode_text(['a photo'])


def test_what_vlp_cannot_import_is_one_line(tmp_path, capsys):
  src = tmp_path / 'oc'
  src.mkdir()
  cfg = _clip_config(False)
  cfg['vision_cfg']['ls_init_value'] = 1e-5  # LayerScale: another architecture
  (src / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg}))
  assert cli.main(['import', str(src), f'--out={tmp_path / "o"}']) == 2
  assert 'vision_cfg.ls_init_value=1e-05 is not supported' in capsys.readouterr().err
  cfg['vision_cfg'].pop('ls_init_value')
  (src / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg}))
  (src / 'open_clip_pytorch_model.bin').write_bytes(b'not read')
  assert cli.main(['import', str(src), f'--out={tmp_path / "o"}']) == 2
  assert 'is a torch pickle, which vlp does not load' in capsys.readouterr().err
  assert cli.main(['import', str(tmp_path), f'--out={tmp_path / "o"}']) == 2
  assert 'is not an open_clip directory' in capsys.readouterr().err


def test_quick_gelu_is_clips():
  x = np.linspace(-4, 4, 41, dtype=np.float32)
  np.testing.assert_allclose(layers.Arch(gelu='quick').activation(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)


@pytest.mark.slow
def test_lit_on_an_imported_image_tower_keeps_it_bit_for_bit(tmp_path):
  """The issue's LiT: lock an imported tower, train the text tower on the built-in data."""
  from vlp.train import loop
  src, *_ = _open_clip_dir(tmp_path, quick_gelu=True)
  imported = tmp_path / 'imported'
  assert cli.main(['import', str(src), f'--out={imported}']) == 0
  model = json.loads((imported / 'config.json').read_text())['model']
  c = tiny_config(total_steps=3, **{'init.from': str(imported), 'init.only': ('image/.*', 'image_proj/.*'),
                                    'optim.frozen': ('image/.*', 'image_proj/.*'), 'model.embed_dim': 32})
  c.model.image.update(model['image'])
  c.model.arch.update(model['arch'])
  loop.train(c, str(tmp_path / 'lit'), progress=False)
  _, params, _ = checkpoints.restore_params(str(tmp_path / 'lit'))
  got = {k: np.asarray(v) for k, v in trees.flatten(params)}
  src_flat = safetensors.numpy.load_file(str(imported / 'model.safetensors'))
  image = [k for k in got if k.startswith(('image.', 'image_proj.'))]
  assert image and all(np.array_equal(got[k], src_flat[k]) for k in image)
  assert not np.array_equal(got['text.token_embed'][:5], np.zeros_like(got['text.token_embed'][:5]))


HF_REF = os.path.join(os.path.dirname(__file__), 'hf_clip_ref.py')


def _hf(tmp_path, *args):
  """Runs tests/hf_clip_ref.py in the open_clip environment (skips where it lacks transformers)."""
  python = transformers_python()
  images, tokens = _inputs(np.random.default_rng(0))
  np.savez(tmp_path / 'hf_in.npz', image_nchw=images.transpose(0, 3, 1, 2), tokens=tokens)
  proc = subprocess.run([python, HF_REF, *args, '--inputs', str(tmp_path / 'hf_in.npz')], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return images, tokens


HF_CONFIGS = {  # small random models of each architecture transformers names
    'clip': {'projection_dim': 32,
             'text_config': {'vocab_size': VOCAB, 'hidden_size': 48, 'intermediate_size': 192, 'num_hidden_layers': 2,
                             'num_attention_heads': 2, 'max_position_embeddings': CONTEXT, 'eos_token_id': VOCAB - 1,
                             'bos_token_id': VOCAB - 2, 'pad_token_id': 0},
             'vision_config': {'hidden_size': 64, 'intermediate_size': 256, 'num_hidden_layers': 2,
                               'num_attention_heads': 2, 'image_size': 16, 'patch_size': 4}},
    # SigLIP: the text projected to the vision width; a MAP head; exact GELU to differ from its default
    'siglip': {'text_config': {'vocab_size': VOCAB, 'hidden_size': 48, 'intermediate_size': 192,
                               'num_hidden_layers': 2, 'num_attention_heads': 2, 'max_position_embeddings': CONTEXT,
                               'projection_size': 64, 'eos_token_id': VOCAB - 1, 'bos_token_id': VOCAB - 2,
                               'pad_token_id': 1},  # SigLIP's own: it pads with its EOS
               'vision_config': {'hidden_size': 64, 'intermediate_size': 256, 'num_hidden_layers': 2,
                                 'num_attention_heads': 4, 'image_size': 16, 'patch_size': 4}},
}


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['clip', 'siglip'])
def test_transformers_in_and_out_give_the_same_embeddings(tmp_path, arch):
  """A random transformers CLIPModel / SiglipModel imported (HF -> vlp), and vlp's import
  exported back (vlp -> HF) and loaded by from_pretrained: all three embed alike."""
  (tmp_path / 'hf_cfg.json').write_text(json.dumps(HF_CONFIGS[arch]))
  src = tmp_path / 'hf'
  images, tokens = _hf(tmp_path, 'build', '--config', str(tmp_path / 'hf_cfg.json'), '--out', str(src),
                       f'--model={arch}')
  want = dict(np.load(src / 'embeddings.npz'))
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  enc = pretrained.load(str(tmp_path / 'vlp'))
  diffs = {'import image': np.abs(enc.encode_image(images) - want['image']).max(),
           'import text': np.abs(enc.encode_text(tokens) - want['text']).max()}
  back = tmp_path / 'hf_back'
  assert cli.main(['export', f'--workdir={tmp_path / "vlp"}', '--format=hf', f'--out={back}']) == 0
  _hf(tmp_path, 'embed', '--out', str(back), f'--model={arch}')
  again = dict(np.load(back / 'embeddings.npz'))
  diffs.update({'export image': np.abs(again['image'] - want['image']).max(),
                'export text': np.abs(again['text'] - want['text']).max(),
                'logits': np.abs(again['logits'] - want['logits']).max()})
  print(f'transformers {arch} parity:', {k: f'{v:.2e}' for k, v in diffs.items()})
  assert max(diffs.values()) <= 1e-4, diffs
  exported = json.loads((back / 'config.json').read_text())['text_config']
  assert exported['pad_token_id'] == HF_CONFIGS[arch]['text_config']['pad_token_id']
  if arch == 'siglip':  # the head's learnt scale and bias came through the import
    weights = weights_files.read(str(tmp_path / 'vlp'))
    assert np.isclose(np.exp(weights['log_scale']), want['logit_scale']) and np.isclose(weights['bias'],
                                                                                       want['logit_bias'])


@pytest.mark.slow
def test_an_open_clip_import_exports_to_transformers_and_a_model_without_ln_pre_does_not(tmp_path, capsys):
  src, images, tokens, want = _open_clip_dir(tmp_path, quick_gelu=False)
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  out = tmp_path / 'hf'
  assert cli.main(['export', f'--workdir={tmp_path / "vlp"}', '--format=hf', f'--out={out}']) == 0
  _hf(tmp_path, 'embed', '--out', str(out))
  got = dict(np.load(out / 'embeddings.npz'))
  assert np.abs(got['image'] - want['image']).max() <= 1e-4 and np.abs(got['text'] - want['text']).max() <= 1e-4
  # vlp's own default towers (no ln_pre, bidirectional option) are not a CLIPModel: one line says why
  from vlp.train import loop
  loop.train(tiny_config(total_steps=1), str(tmp_path / 'wd'), progress=False)
  capsys.readouterr()
  assert cli.main(['export', f'--workdir={tmp_path / "wd"}', '--format=hf', f'--out={tmp_path / "x"}']) == 2
  err = capsys.readouterr().err
  assert 'is not a CLIPModel: no ln_pre' in err and len(err.strip().splitlines()) == 1, err


SIGLIP_LAYOUT = {'model.head': 'sigmoid', 'model.image.pool': 'map', 'model.image.cls_token': False,
                 'model.image_proj': False, 'model.proj_bias': True, 'model.text.causal': False,
                 'model.text.pool': 'last', 'model.text.padding_mask': False}


@pytest.mark.slow
def test_a_model_trained_in_siglips_layout_exports_to_transformers(tmp_path):
  """vlp trains SigLIP's towers (MAP head, no image projection, unmasked text pooled last) and
  hands them to transformers: SiglipModel.from_pretrained embeds as vlp does."""
  from conftest import build_model
  from flax import nnx
  from vlp.train import loop
  loop.train(tiny_config(total_steps=1, **SIGLIP_LAYOUT), str(tmp_path / 'wd'), progress=False)
  out = tmp_path / 'hf'
  assert cli.main(['export', f'--workdir={tmp_path / "wd"}', '--format=hf', f'--out={out}']) == 0
  images, tokens = _hf(tmp_path, 'embed', '--out', str(out), '--model=siglip')
  config, params, _ = checkpoints.restore_params(str(tmp_path / 'wd'))
  model = build_model(config.model)
  nnx.update(model, params)
  got = dict(np.load(out / 'embeddings.npz'))
  diffs = [np.abs(np.asarray(model.encode_image(images)) - got['image']).max(),
           np.abs(np.asarray(model.encode_text(tokens)) - got['text']).max()]
  print('trained in SigLIP\'s layout, against SiglipModel:', [f'{d:.2e}' for d in diffs])
  assert max(diffs) <= 1e-4, diffs


def test_the_sigmoid_head_on_vlps_default_towers_is_not_a_siglip_model_and_the_reasons_name_the_options():
  from conftest import build_model
  from flax import nnx
  from vlp.interop import hf_siglip
  def reasons(**overrides):
    model_cfg = tiny_config(**overrides).model
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(model_cfg)), nnx.Param))
    return hf_siglip.exportable(model_cfg.to_dict(), params)
  why = ' '.join(reasons(**{'model.head': 'sigmoid'}))
  for option in ('model.image_proj=False', 'model.image.pool=map', 'padding_mask=False', 'model.proj_bias=True'):
    assert option in why, why
  assert reasons(**SIGLIP_LAYOUT) == []


# ---- big_vision: a random checkpoint under its names, against a numpy forward written from
# big_vision's modules (vit.py's Encoder1DBlock and MAPHead, text_transformer.py, two_towers.py)

def _big_vision_npz(rng, pool, scan, image_head):
  w, tw, mlp, p, grid, vocab, length, embed = 32, 24, 64, 4, 4, 100, 8, 32 if not image_head else 20
  r = lambda *shape: rng.normal(0, 0.3, shape).astype(np.float32)
  def attention(prefix, width, heads):
    hd = width // heads
    return {**{f'{prefix}/{n}/kernel': r(width, heads, hd) for n in ('query', 'key', 'value')},
            **{f'{prefix}/{n}/bias': r(heads, hd) for n in ('query', 'key', 'value')},
            f'{prefix}/out/kernel': r(heads, hd, width), f'{prefix}/out/bias': r(width)}
  def block(prefix, width, heads):
    return {**attention(f'{prefix}/MultiHeadDotProductAttention_0', width, heads),
            **{f'{prefix}/LayerNorm_{i}/{n}': 1 + r(width) if n == 'scale' else r(width)
               for i in (0, 1) for n in ('scale', 'bias')},
            f'{prefix}/MlpBlock_0/Dense_0/kernel': r(width, mlp), f'{prefix}/MlpBlock_0/Dense_0/bias': r(mlp),
            f'{prefix}/MlpBlock_0/Dense_1/kernel': r(mlp, width), f'{prefix}/MlpBlock_0/Dense_1/bias': r(width)}
  def encoder(prefix, width, heads, final):
    blocks = [block('', width, heads) for _ in range(2)]
    if scan:  # nn.scan: one `encoderblock` whose arrays stack the blocks on a leading axis
      out = {f'{prefix}/encoderblock{k}': np.stack([b[k] for b in blocks]) for k in blocks[0]}
    else:
      out = {f'{prefix}/encoderblock_{i}{k}': v for i, b in enumerate(blocks) for k, v in b.items()}
    return {**out, f'{prefix}/{final}/scale': 1 + r(width), f'{prefix}/{final}/bias': r(width)}
  flat = {'img/embedding/kernel': r(p, p, 3, w), 'img/embedding/bias': r(w), 'img/pos_embedding': r(1, grid ** 2, w),
          **encoder('img/Transformer', w, 2, 'encoder_norm'),
          'txt/Embed_0/embedding': r(vocab, tw), 'txt/pos_embedding': r(1, length, tw),
          **encoder('txt/Encoder_0', tw, 2, 'encoder_norm'),
          'txt/head/kernel': r(tw, embed), 'txt/head/bias': r(embed), 't': np.array([2.3], np.float32)}
  if pool == 'map':
    flat.update({'img/MAPHead_0/probe': r(1, 1, w), **attention('img/MAPHead_0/MultiHeadDotProductAttention_0', w, 2),
                 'img/MAPHead_0/LayerNorm_0/scale': 1 + r(w), 'img/MAPHead_0/LayerNorm_0/bias': r(w),
                 'img/MAPHead_0/MlpBlock_0/Dense_0/kernel': r(w, mlp), 'img/MAPHead_0/MlpBlock_0/Dense_0/bias': r(mlp),
                 'img/MAPHead_0/MlpBlock_0/Dense_1/kernel': r(mlp, w), 'img/MAPHead_0/MlpBlock_0/Dense_1/bias': r(w),
                 'b': np.array([-10.0], np.float32)})
  else:
    flat['img/cls'] = r(1, 1, w)
  if image_head:
    flat.update({'img/head/kernel': r(w, embed), 'img/head/bias': r(embed)})
  return flat


def _big_vision_embed(flat, images, tokens):
  """big_vision's two towers in numpy, from the checkpoint's names alone."""
  ln = lambda x, pre: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
                       * flat[f'{pre}/scale'] + flat[f'{pre}/bias'])
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))  # flax's nn.gelu
  def get_block(prefix, i):
    if f'{prefix}/encoderblock_0/LayerNorm_0/scale' in flat:
      return lambda n: flat[f'{prefix}/encoderblock_{i}/{n}']
    return lambda n: flat[f'{prefix}/encoderblock/{n}'][i]
  def mha(xq, xkv, g):
    q, k, v = (np.einsum('bld,dhk->blhk', x, g(f'{n}/kernel')) + g(f'{n}/bias')
               for x, n in ((xq, 'query'), (xkv, 'key'), (xkv, 'value')))
    logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return np.einsum('bhqs,bshk,hkd->bqd', a, v, g('out/kernel')) + g('out/bias')
  def mlp(x, g):
    return gelu(x @ g('Dense_0/kernel') + g('Dense_0/bias')) @ g('Dense_1/kernel') + g('Dense_1/bias')
  def encoder(x, prefix):
    depth = 2
    for i in range(depth):
      g = get_block(prefix, i)
      lng = lambda x, n: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6) * g(
          f'{n}/scale') + g(f'{n}/bias')
      y = lng(x, 'LayerNorm_0')
      x = x + mha(y, y, lambda n: g(f'MultiHeadDotProductAttention_0/{n}'))
      x = x + mlp(lng(x, 'LayerNorm_1'), lambda n: g(f'MlpBlock_0/{n}'))
    return ln(x, f'{prefix}/encoder_norm')
  b, size = images.shape[0], images.shape[1]
  p = flat['img/embedding/kernel'].shape[0]
  patches = images.reshape(b, size // p, p, size // p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p, p, 3)
  x = np.einsum('bnpqc,pqcw->bnw', patches, flat['img/embedding/kernel']) + flat['img/embedding/bias']
  x = x + flat['img/pos_embedding']
  if 'img/cls' in flat:  # pool_type 'tok': the token joins after the position embeddings
    x = np.concatenate([np.broadcast_to(flat['img/cls'], (b, 1, x.shape[-1])), x], axis=1)
  x = encoder(x, 'img/Transformer')
  if 'img/MAPHead_0/probe' in flat:
    h = lambda n: flat[f'img/MAPHead_0/{n}']
    y = mha(np.broadcast_to(h('probe'), (b, 1, x.shape[-1])), x, lambda n: h(f'MultiHeadDotProductAttention_0/{n}'))
    image = (y + mlp(ln(y, 'img/MAPHead_0/LayerNorm_0'), lambda n: h(f'MlpBlock_0/{n}')))[:, 0]
  else:
    image = x[:, 0]
  if 'img/head/kernel' in flat:
    image = image @ flat['img/head/kernel'] + flat['img/head/bias']
  t = flat['txt/Embed_0/embedding'][tokens] + flat['txt/pos_embedding'][:, :tokens.shape[1]]
  text = encoder(t, 'txt/Encoder_0')[:, -1] @ flat['txt/head/kernel'] + flat['txt/head/bias']
  norm = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)
  return norm(image), norm(text)


@pytest.mark.parametrize('pool,scan,image_head', [('map', False, False),  # SigLIP
                                                  pytest.param('tok', True, True, marks=pytest.mark.slow)])
def test_big_vision_import_gives_big_visions_embeddings(tmp_path, pool, scan, image_head):
  rng = np.random.default_rng(0)
  flat = _big_vision_npz(rng, pool, scan, image_head)
  np.savez(tmp_path / 'siglip.npz', **{f'params/{k}': v for k, v in flat.items()})
  assert cli.main(['import', str(tmp_path / 'siglip.npz'), f'--out={tmp_path / "vlp"}']) == 0
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  tokens = rng.integers(0, 100, size=(3, 8)).astype(np.int32)
  tokens[0, 5:] = 1  # SigLIP's sticky EOS padding
  want_image, want_text = _big_vision_embed({k: v.astype(np.float64) for k, v in flat.items()}, images, tokens)
  enc = pretrained.load(str(tmp_path / 'vlp'))
  diffs = [np.abs(enc.encode_image(images) - want_image).max(), np.abs(enc.encode_text(tokens) - want_text).max()]
  print(f'big_vision parity ({pool}, scan={scan}):', [f'{d:.2e}' for d in diffs])
  assert max(diffs) <= 1e-4, diffs
  weights = weights_files.read(str(tmp_path / 'vlp'))
  assert np.isclose(weights['log_scale'], 2.3) and ('bias' in weights) == (pool == 'map')


CAPTIONS = ['a red circle left of a blue square', 'Two green triangles',
            'a small yellow star above a large purple circle next to two red squares and a blue triangle']


def _tokenizer_json(path):
  """A small BPE tokenizer in the hub format, with CLIP's start and end tokens added around
  every caption by its post-processor."""
  import tokenizers
  from tokenizers import models, normalizers, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
  specials = ['<pad>', '<unk>', '<|startoftext|>', '<|endoftext|>']
  words = 'a an the red blue green yellow purple small large circle square triangle star left right above below ' \
          'of next to two three and with'.split()
  tok.train_from_iterator([' '.join(words[i:] + words[:i]) for i in range(len(words))],
                          trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
  tok.post_processor = processors.TemplateProcessing(single='<|startoftext|> $A <|endoftext|>',
                                                     special_tokens=[(t, tok.token_to_id(t)) for t in specials[2:]])
  tok.save(str(path))
  return tok.token_to_id('<|endoftext|>')


@pytest.mark.slow
def test_an_import_takes_captions_through_its_sources_tokenizer_and_hands_it_on(tmp_path):
  """A CLIPModel directory with a tokenizer.json: the import encodes strings as transformers
  tokenises them (the same ids, cut to the context with the end token kept, zero-padded) and
  CLIPModel embeds them; `vlp export --format=hf` carries the tokenizer on."""
  cfg = json.loads(json.dumps(HF_CONFIGS['clip']))
  cfg['text_config'].update(eos_token_id=3, bos_token_id=2)  # the tokenizer's ids
  (tmp_path / 'hf_cfg.json').write_text(json.dumps(cfg))
  src = tmp_path / 'hf'
  _hf(tmp_path, 'build', '--config', str(tmp_path / 'hf_cfg.json'), '--out', str(src))
  assert _tokenizer_json(src / 'tokenizer.json') == 3
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  back = tmp_path / 'hf_back'
  assert cli.main(['export', f'--workdir={tmp_path / "vlp"}', '--format=hf', f'--out={back}']) == 0
  assert (back / 'tokenizer.json').read_bytes() == (src / 'tokenizer.json').read_bytes()
  (tmp_path / 'texts.json').write_text(json.dumps(CAPTIONS))
  _hf(tmp_path, 'embed', '--out', str(back), f'--texts={tmp_path / "texts.json"}')
  want = dict(np.load(back / 'embeddings.npz'))
  enc = pretrained.load(str(tmp_path / 'vlp'))
  got_tokens = enc.tokenize(CAPTIONS)
  np.testing.assert_array_equal(got_tokens, want['tokens'])
  assert got_tokens[2, -1] == 3 and (got_tokens[2] != 0).all() and (got_tokens[0] == 0).any()  # cut, then padded
  diff = np.abs(enc.encode_text(CAPTIONS) - want['text']).max()
  print(f'strings through the source tokenizer: {diff:.2e}')
  assert diff <= 1e-4


def _spiece(path, vocab_size):
  """A small SentencePiece model with SigLIP's special ids: </s> (EOS and padding) = 1, <unk> = 2."""
  import sentencepiece as spm
  words = 'a an the red blue green yellow purple small large circle square triangle star left right above below ' \
          'of next to two three and with'.split()
  spm.SentencePieceTrainer.train(sentence_iterator=iter([' '.join(words[i:] + words[:i]) for i in range(len(words))]),
                                 model_prefix=str(path), vocab_size=vocab_size, model_type='unigram', pad_id=0,
                                 eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  return f'{path}.model'


@pytest.mark.slow
def test_a_siglip_import_takes_captions_through_its_sentencepiece_model(tmp_path):
  """A SiglipModel directory with SiglipTokenizer's spiece.model: the import encodes strings as
  transformers tokenises them (lower-cased, punctuation removed, EOS kept when cut, padded with
  </s>) and SiglipModel embeds them alike; the tokenizer travels on to the HF export."""
  cfg = json.loads(json.dumps(HF_CONFIGS['siglip']))
  cfg['text_config'].update(eos_token_id=1, pad_token_id=1)  # the tokenizer's </s>
  (tmp_path / 'hf_cfg.json').write_text(json.dumps(cfg))
  src = tmp_path / 'hf'
  _hf(tmp_path, 'build', '--config', str(tmp_path / 'hf_cfg.json'), '--out', str(src), '--model=siglip',
      f'--spiece={_spiece(tmp_path / "sp", 200)}')
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  back = tmp_path / 'hf_back'
  assert cli.main(['export', f'--workdir={tmp_path / "vlp"}', '--format=hf', f'--out={back}']) == 0
  assert (back / 'spiece.model').read_bytes() == (src / 'spiece.model').read_bytes()
  captions = CAPTIONS + ['Two  GREEN triangles!!', 'a red, circle; left of: the square.']
  (tmp_path / 'texts.json').write_text(json.dumps(captions))
  _hf(tmp_path, 'embed', '--out', str(back), '--model=siglip', f'--texts={tmp_path / "texts.json"}')
  want = dict(np.load(back / 'embeddings.npz'))
  enc = pretrained.load(str(tmp_path / 'vlp'))
  got_tokens = enc.tokenize(captions)
  np.testing.assert_array_equal(got_tokens, want['tokens'])
  assert got_tokens[2, -1] == 1 and (got_tokens[1] == 1).sum() > 1  # cut with EOS kept; padded with </s>
  diff = np.abs(enc.encode_text(captions) - want['text']).max()
  print(f'strings through SigLIP\'s SentencePiece model: {diff:.2e}')
  assert diff <= 1e-4


def test_a_big_vision_import_takes_strings_through_the_tokenizer_it_is_given(tmp_path):
  """`vlp import X.npz --tokenizer=SP.model`: big_vision's captions, the model's pieces of the
  text as it is, then EOS (id 1, kept when cut), padded with 1."""
  import sentencepiece as spm
  flat = _big_vision_npz(np.random.default_rng(0), pool='map', scan=False, image_head=False)
  np.savez(tmp_path / 'siglip.npz', **flat)
  sp_model = _spiece(tmp_path / 'sp', 80)  # within the checkpoint's 100 ids
  assert cli.main(['import', str(tmp_path / 'siglip.npz'), f'--out={tmp_path / "vlp"}', f'--tokenizer={sp_model}']) == 0
  enc = pretrained.load(str(tmp_path / 'vlp'))
  sp = spm.SentencePieceProcessor(model_file=sp_model)
  length = enc.context_length
  want = np.ones((len(CAPTIONS), length), np.int32)
  for row, text in zip(want, CAPTIONS):
    ids = sp.encode(text)
    ids = (ids[:length - 1] if len(ids) >= length else ids) + [1]
    row[:len(ids)] = ids
  np.testing.assert_array_equal(enc.tokenize(CAPTIONS), want)
  np.testing.assert_array_equal(enc.encode_text(CAPTIONS), enc.encode_text(want))
