"""The text pooled where its source pools it (issue 34): transformers' CLIPTextTransformer takes
the first `eos_token_id` of each row (the highest id where eos_token_id is 2), whatever the
padding. Random CLIPModels built on the spot with transformers (tests/hf_clip_pooling_ref.py,
in the open_clip environment), imported with `vlp import`, run by load_pretrained, trained from
with init.from and exported back with `--format=hf`: the same text embeddings as transformers'."""
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import tiny_config, transformers_python

from vlp import cli, pretrained
from vlp.core.config import ConfigError
from vlp.models import text as text_lib

REF = os.path.join(os.path.dirname(__file__), 'hf_clip_pooling_ref.py')
VOCAB, CONTEXT = 1000, 16
EOT = VOCAB - 1  # CLIP's end of text: its highest id


def _rows(rng, bos, eos, pad, inside=()):
  """[B, CONTEXT] ids: a short caption, one holding `inside` ids (0 is a word in CLIP's
  vocabulary), one filling the context with its end token last, one filling it with none."""
  words = lambda n: rng.choice(np.setdiff1d(np.arange(VOCAB - 2), [eos]), n)
  captions = [[bos, *words(3), eos], [bos, *words(3), *inside, *words(2), eos],
              [bos, *words(CONTEXT - 2), eos], [bos, *words(CONTEXT - 1)]]
  return np.array([c + [pad] * (CONTEXT - len(c)) for c in captions], np.int64)


# name: (text_config ids, the id captions end in, the id they are padded with)
CASES = {
    'pad 0': ({'bos_token_id': VOCAB - 2, 'eos_token_id': EOT, 'pad_token_id': 0}, EOT, 0),
    'pad 1': ({'bos_token_id': VOCAB - 2, 'eos_token_id': EOT, 'pad_token_id': 1}, EOT, 1),
    'EOS as padding': ({'bos_token_id': VOCAB - 2, 'eos_token_id': EOT, 'pad_token_id': EOT}, EOT, EOT),
    # OpenAI's hub configs: eos_token_id 2, pooled at the highest id; their tokenizer pads with EOT
    'legacy eos_token_id 2': ({'bos_token_id': 0, 'eos_token_id': 2, 'pad_token_id': 1}, EOT, EOT),
}
STRINGS = 'strings, EOS as padding'  # a tokenizer.json's captions, padded by transformers with its end token
CAPTIONS = ['a red circle left of a blue square', 'Two green triangles',
            'a small yellow star above a large purple circle next to two red squares and a blue triangle']


def _cases(rng) -> list[dict]:
  cases = [{'name': name, 'text_config': ids, 'tokens': _rows(rng, ids['bos_token_id'], eos, pad,
                                                              inside=(0, pad, 2)).tolist()}
           for name, (ids, eos, pad) in CASES.items()]
  ids = {'bos_token_id': 2, 'eos_token_id': 3, 'pad_token_id': 3}  # the ids of test_interop's tokenizer.json
  cases.append({'name': STRINGS, 'text_config': ids, 'tokens': _rows(rng, 2, 3, 3, inside=(0,)).tolist(),
                'texts': CAPTIONS, 'pad_token': '<|endoftext|>'})
  return cases


def _ref(python, mode, cases_path, out):
  proc = subprocess.run([python, REF, mode, '--cases', str(cases_path), '--out', str(out)], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """{name: (case, transformers' embeddings, the import, transformers' embeddings of the import's
  HF export, that export)}."""
  from test_interop import _tokenizer_json
  python = transformers_python()
  tmp = tmp_path_factory.mktemp('pooling')
  cases = _cases(np.random.default_rng(0))
  (tmp / 'cases.json').write_text(json.dumps(cases))
  (tmp / 'hf' / STRINGS).mkdir(parents=True)
  assert _tokenizer_json(tmp / 'hf' / STRINGS / 'tokenizer.json') == 3
  _ref(python, 'build', tmp / 'cases.json', tmp / 'hf')
  for case in cases:
    name = case['name']
    assert cli.main(['import', str(tmp / 'hf' / name), f'--out={tmp / "vlp" / name}']) == 0
    assert cli.main(['export', f'--workdir={tmp / "vlp" / name}', '--format=hf', f'--out={tmp / "back" / name}']) == 0
  _ref(python, 'embed', tmp / 'cases.json', tmp / 'back')
  return {c['name']: (c, dict(np.load(tmp / 'hf' / c['name'] / 'embeddings.npz')), tmp / 'vlp' / c['name'],
                      dict(np.load(tmp / 'back' / c['name'] / 'embeddings.npz')), tmp / 'back' / c['name'])
          for c in cases}


def _worst_cosine(a, b):
  return float(np.min(np.sum(a * b, axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


@pytest.mark.parametrize('name', [*CASES, STRINGS])
def test_an_import_embeds_ids_as_transformers_does(built, name):
  case, want, imported, _, _ = built[name]
  got = pretrained.load(str(imported)).encode_text(np.asarray(case['tokens'], np.int32))
  cosine, diff = _worst_cosine(got, want['ids']), np.abs(got - want['ids']).max()
  print(f'{name}: worst cosine {cosine:.7f}, max abs difference {diff:.2e}')
  assert cosine >= 0.9999 and diff <= 1e-4, (cosine, diff)
  text = json.loads((imported / 'config.json').read_text())['model']['text']
  legacy = case['text_config']['eos_token_id'] == 2
  assert (text['pool'], text['eos_id']) == (('argmax', -1) if legacy else ('eos', case['text_config']['eos_token_id']))
  assert text['pad_id'] == case['text_config']['pad_token_id'] and not text['padding_mask']


def test_an_import_embeds_strings_as_transformers_does(built):
  case, want, imported, _, _ = built[STRINGS]
  enc = pretrained.load(str(imported))
  assert (want['text_tokens'][1] == 3).sum() > 1  # transformers padded with the end token, vlp's tokenizer with 0
  got = enc.encode_text(case['texts'])
  cosine = _worst_cosine(got, want['texts'])
  print(f'strings: worst cosine {cosine:.7f}')
  assert cosine >= 0.9999, cosine


@pytest.mark.parametrize('name', [*CASES, STRINGS])
def test_the_hf_export_pools_the_same_token(built, name):
  """The exported config carries the source's eos and pad ids, so transformers pools as before."""
  case, want, _, again, back = built[name]
  exported = json.loads((back / 'config.json').read_text())['text_config']
  assert {k: exported[k] for k in ('eos_token_id', 'pad_token_id')} == {
      k: case['text_config'][k] for k in ('eos_token_id', 'pad_token_id')}
  assert _worst_cosine(again['ids'], want['ids']) >= 0.9999


def test_training_from_an_import_pools_as_transformers_does(built):
  """A run's model built from the import's text section (init.from takes its params) is
  validated and embeds the ids as transformers does."""
  from conftest import build_model
  from flax import nnx
  from vlp import validation
  from vlp.train import init_from
  case, want, imported, _, _ = built['pad 1']
  model = json.loads((imported / 'config.json').read_text())['model']
  c = tiny_config(**{'init.from': str(imported), 'model.embed_dim': model['embed_dim']})
  for key in ('image', 'text', 'arch'):
    c.model[key].update(model[key])
  validation.validate(c, 8)
  m = build_model(c.model)
  nnx.update(m, init_from.load(c, nnx.to_pure_dict(nnx.state(m, nnx.Param)), log=lambda *_: None))
  got = np.asarray(m.encode_text(np.asarray(case['tokens'], np.int32)))
  assert _worst_cosine(got, want['ids']) >= 0.9999


@pytest.mark.parametrize('text_cfg', [{}, {'pool_type': 'eos', 'eos_id': 5, 'pad_id': 1}],
                         ids=['argmax', 'eos'])
def test_an_open_clip_import_pools_as_open_clip_does(tmp_path, text_cfg):
  """open_clip's pooling at the highest id (its default) or at the first eos_id: ids padded
  with the end token or its pad_id, holding 0 (a word), and filling the context with none."""
  from test_interop import REF as OPEN_CLIP_REF, _clip_config
  from vlp.bench import compare
  try:
    python = compare.bench_python(None)
  except compare.ReferenceEnvError as e:
    pytest.skip(str(e))
  cfg = _clip_config(quick_gelu=True)
  cfg['text_cfg'].update(text_cfg)
  eos, pad = (5, 1) if text_cfg else (EOT, EOT)
  tokens = _rows(np.random.default_rng(1), VOCAB - 2, eos, pad, inside=(0, pad))
  (tmp_path / 'cfg.json').write_text(json.dumps(cfg))
  np.savez(tmp_path / 'in.npz', image_nchw=np.zeros((len(tokens), 3, 16, 16), np.float32), tokens=tokens)
  src = tmp_path / 'open_clip'
  proc = subprocess.run([python, OPEN_CLIP_REF, '--config', str(tmp_path / 'cfg.json'), '--inputs',
                         str(tmp_path / 'in.npz'), '--out', str(src)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import safetensors.numpy
  safetensors.numpy.save_file(dict(np.load(src / 'state_dict.npz')), str(src / 'open_clip_model.safetensors'))
  assert cli.main(['import', str(src), f'--out={tmp_path / "vlp"}']) == 0
  got = pretrained.load(str(tmp_path / 'vlp')).encode_text(tokens.astype(np.int32))
  cosine = _worst_cosine(got, np.load(src / 'embeddings.npz')['text'])
  print(f'open_clip {text_cfg or "argmax"}: worst cosine {cosine:.7f}')
  assert cosine >= 0.9999, cosine


def test_pooled_positions_of_each_rule():
  """Against the rules written out: transformers' first eos (0 without one), its legacy argmax,
  vlp's last token before padding, SigLIP's last position, [CLS]."""
  tokens = np.array([[7, 5, 9, 9, 0, 0], [7, 9, 5, 1, 1, 1], [7, 5, 5, 5, 5, 5], [7, 0, 5, 9, 0, 0]])
  position = lambda *a: np.broadcast_to(np.asarray(text_lib.pooled_position(tokens, *a)), (4,)) % 6
  np.testing.assert_array_equal(position('eos', 1, 9), [2, 1, 0, 3])
  np.testing.assert_array_equal(position('argmax'), [2, 1, 0, 3])
  np.testing.assert_array_equal(position('eos', 0), [3, 5, 5, 2])  # counts the tokens that are not padding
  np.testing.assert_array_equal(position('last'), [5] * 4)
  np.testing.assert_array_equal(position('cls'), [0] * 4)


@pytest.mark.parametrize('overrides,message', [
    ({'model.text.eos_id': 1024}, "'model.text.eos_id': must be an int in [-1, vocab_size 1024)"),
    ({'model.text.pad_id': -1}, "'model.text.pad_id': must be an int in [0, vocab_size 1024)"),
    ({'model.text.eos_id': 3, 'model.text.pool': 'argmax'}, "is read by pool='eos' alone"),
    ({'model.text.pool': 'first'}, "'model.text.pool': 'first' not in cls/eos/last/argmax"),
])
def test_bad_token_ids_are_one_line(overrides, message):
  from vlp import validation
  with pytest.raises(ConfigError, match=None) as e:
    validation.validate(tiny_config(**overrides), 8)
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.parametrize('eos,message', [(1000, 'is outside the vocabulary (1000)'),
                                         ([2, 999], 'vlp pools the text at one end token id')])
def test_an_end_token_vlp_cannot_pool_at_is_refused_at_import(tmp_path, capsys, eos, message):
  from test_interop import HF_CONFIGS
  cfg = json.loads(json.dumps(HF_CONFIGS['clip']))
  cfg['text_config']['eos_token_id'] = eos
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps({**cfg, 'architectures': ['CLIPModel']}))
  assert cli.main(['import', str(tmp_path / 'hf'), f'--out={tmp_path / "o"}']) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err


def test_load_pretrained_returns_arrays_the_caller_may_write(tmp_path):
  from conftest import build_model
  from flax import nnx
  from vlp import export
  from vlp.core import trees
  c = tiny_config()
  flat = dict(trees.flatten(nnx.to_pure_dict(nnx.state(build_model(c.model), nnx.Param))))
  export.write(str(tmp_path / 'e'), c.model, flat)
  enc = pretrained.load(str(tmp_path / 'e'))
  image = enc.encode_image(np.zeros((2, 16, 16, 3), np.uint8))
  text = enc.encode_text(np.ones((2, 16), np.int32))
  for x in (image, text):
    x *= 2  # raises on a read-only array
    assert x.flags.writeable and x.flags.owndata
