"""`vlp import` of open_clip checkpoints and transformers CLIPModel directories, `vlp export
--format=hf`: small models built on the spot with random weights (in the open_clip environment),
imported or exported, and run on both sides; embeddings equal in fp32. Then LiT from an import:
its image tower locked, a text tower trained from scratch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from conftest import tiny_config

from vlp import checkpoint, cli, export, pretrained
from vlp.bench import compare
from vlp.models import layers

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
  _, params, _ = export.restore_params(str(tmp_path / 'lit'))
  got = {k: np.asarray(v) for k, v in checkpoint.flatten(params)}
  src_flat = safetensors.numpy.load_file(str(imported / 'model.safetensors'))
  image = [k for k in got if k.startswith(('image.', 'image_proj.'))]
  assert image and all(np.array_equal(got[k], src_flat[k]) for k in image)
  assert not np.array_equal(got['text.token_embed'][:5], np.zeros_like(got['text.token_embed'][:5]))


HF_REF = os.path.join(os.path.dirname(__file__), 'hf_clip_ref.py')


def _hf(tmp_path, *args):
  """Runs tests/hf_clip_ref.py in the open_clip environment (skips where it lacks transformers)."""
  try:
    python = compare.bench_python(None)
  except compare.ReferenceEnvError as e:
    pytest.skip(str(e))
  if subprocess.run([python, '-c', 'import transformers'], capture_output=True).returncode:
    pytest.skip('the open_clip environment has no transformers (launch/setup_bench_env.sh installs it)')
  images, tokens = _inputs(np.random.default_rng(0))
  np.savez(tmp_path / 'hf_in.npz', image_nchw=images.transpose(0, 3, 1, 2), tokens=tokens)
  proc = subprocess.run([python, HF_REF, *args, '--inputs', str(tmp_path / 'hf_in.npz')], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return images, tokens


@pytest.mark.slow
def test_transformers_clip_in_and_out_give_the_same_embeddings(tmp_path):
  """A random transformers CLIPModel imported (HF -> vlp), and vlp's import exported back
  (vlp -> HF) and loaded by CLIPModel.from_pretrained: all three embed alike."""
  cfg = {'projection_dim': 32,
         'text_config': {'vocab_size': VOCAB, 'hidden_size': 48, 'intermediate_size': 192, 'num_hidden_layers': 2,
                         'num_attention_heads': 2, 'max_position_embeddings': CONTEXT, 'eos_token_id': VOCAB - 1,
                         'bos_token_id': VOCAB - 2, 'pad_token_id': 0},
         'vision_config': {'hidden_size': 64, 'intermediate_size': 256, 'num_hidden_layers': 2,
                           'num_attention_heads': 2, 'image_size': 16, 'patch_size': 4}}
  (tmp_path / 'hf_cfg.json').write_text(json.dumps(cfg))
  src = tmp_path / 'hf'
  images, tokens = _hf(tmp_path, 'build', '--config', str(tmp_path / 'hf_cfg.json'), '--out', str(src))
  want = dict(np.load(src / 'embeddings.npz'))
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  enc = pretrained.load(str(tmp_path / 'vlp'))
  diffs = {'import image': np.abs(enc.encode_image(images) - want['image']).max(),
           'import text': np.abs(enc.encode_text(tokens) - want['text']).max()}
  back = tmp_path / 'hf_back'
  assert cli.main(['export', f'--workdir={tmp_path / "vlp"}', '--format=hf', f'--out={back}']) == 0
  _hf(tmp_path, 'embed', '--out', str(back))
  again = dict(np.load(back / 'embeddings.npz'))
  diffs.update({'export image': np.abs(again['image'] - want['image']).max(),
                'export text': np.abs(again['text'] - want['text']).max()})
  print('transformers parity:', {k: f'{v:.2e}' for k, v in diffs.items()})
  assert max(diffs.values()) <= 1e-4, diffs


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
