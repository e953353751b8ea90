"""Export: safetensors + jax.export'ed encoders, round trip, a fresh process without model code, EMA."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import init_of, plan_of, setup_of, tiny_config

import vlp
from vlp import cli
from vlp.core import parallel
from vlp.data import tokenizer as tokenizer_lib
from vlp.train import loop
from vlp.workdir import checkpoints

DECAY = 0.5
pytestmark = pytest.mark.slow  # a short training run first (about a minute on 2 shared cores)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """2 steps with an EMA, a checkpoint after each; inputs and training embeddings of 8 held-out scenes."""
  root = tmp_path_factory.mktemp('export')
  config = tiny_config(total_steps=2, ema_decay=DECAY, **{'checkpoint.every': 1})
  loop.train(config, str(root / 'wd'), progress=False)
  _, params, _ = checkpoints.restore_params(str(root / 'wd'))
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1})
  [(_, _, evaluator)] = loop.Evaluators(plan_of(config), setup_of(config, mesh),
                                            tokenizer_lib.for_config(config)).evaluators
  image_emb, text_emb = evaluator.embed(params)
  return {'root': root, 'wd': str(root / 'wd'), 'config': config, 'image': evaluator.data['image'][:8],
          'text': evaluator.data['text'][:8], 'image_emb': image_emb[:8], 'text_emb': text_emb[:8]}


def _export(trained, name, *flags):
  out = str(trained['root'] / name)
  if not os.path.exists(out):
    assert cli.main(['export', f'--workdir={trained["wd"]}', f'--out={out}', *flags]) == 0
  return out


@pytest.mark.parametrize('dtype,atol', [('float32', 1e-5), ('bf16', 3e-2)])
def test_exported_encoders_give_the_training_embeddings(trained, dtype, atol):
  path = _export(trained, dtype, f'--dtype={dtype}')
  enc = vlp.load_pretrained(path)
  image, text = enc.encode_image(trained['image']), enc.encode_text(trained['text'])
  np.testing.assert_allclose(image, trained['image_emb'], atol=atol)
  np.testing.assert_allclose(text, trained['text_emb'], atol=atol)
  print(f'{dtype}: max |exported - training| image {np.abs(image - trained["image_emb"]).max():.2e} '
        f'text {np.abs(text - trained["text_emb"]).max():.2e}')
  # batch-polymorphic: any batch size, same rows
  np.testing.assert_allclose(enc.encode_image(trained['image'][:3]), image[:3], atol=1e-5)
  # strings are tokenized as in training
  captions = ['a small red circle', 'ein großes blaues Quadrat']
  np.testing.assert_array_equal(enc.tokenize(captions),
                                tokenizer_lib.for_config(trained['config']).encode(captions, 16))
  with open(os.path.join(path, 'config.json')) as f:
    meta = json.load(f)
  assert meta['dtype'] == ('bfloat16' if dtype == 'bf16' else dtype) and meta['step'] == 2


_FRESH = '''
import sys
import numpy as np
import vlp
enc = vlp.load_pretrained(sys.argv[1])
np.save(sys.argv[2] + '/image.npy', enc.encode_image(np.load(sys.argv[2] + '/in_image.npy')))
np.save(sys.argv[2] + '/text.npy', enc.encode_text(np.load(sys.argv[2] + '/in_text.npy')))
loaded = [m for m in sys.modules if m.startswith(('vlp.models', 'vlp.train', 'vlp.export', 'flax', 'optax'))]
assert not loaded, loaded
print('ok')
'''


def test_stablehlo_runs_in_a_fresh_process_without_the_model_code(trained, tmp_path):
  path = _export(trained, 'float32', '--dtype=float32')
  np.save(tmp_path / 'in_image.npy', trained['image'])
  np.save(tmp_path / 'in_text.npy', trained['text'])
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  run = subprocess.run([sys.executable, '-c', _FRESH, path, str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(vlp.__file__))), timeout=120)
  assert run.returncode == 0 and run.stdout.strip() == 'ok', run.stderr[-2000:]
  np.testing.assert_allclose(np.load(tmp_path / 'image.npy'), trained['image_emb'], atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / 'text.npy'), trained['text_emb'], atol=1e-5)


def test_ema_is_the_moving_average_of_the_params(trained):
  config = trained['config']
  setup = setup_of(config, parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1}))
  p0 = init_of(config, setup)['params']
  _, p1, _ = checkpoints.restore_params(trained['wd'], step=1)
  _, p2, _ = checkpoints.restore_params(trained['wd'], step=2)
  _, ema, _ = checkpoints.restore_params(trained['wd'], step=2, weights='ema')
  # ema_1 = d p0 + (1 - d) p1; ema_2 = d ema_1 + (1 - d) p2
  want = jax.tree.map(lambda a, b, c: DECAY * (DECAY * a + (1 - DECAY) * b) + (1 - DECAY) * c, p0, p1, p2)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), ema, want)
  path = _export(trained, 'ema', '--weights=ema')
  enc = vlp.load_pretrained(path)
  assert not np.allclose(enc.encode_image(trained['image']), trained['image_emb'], atol=1e-4)


def test_ema_export_without_an_ema_is_one_clear_error(tmp_path, capsys):
  loop.train(tiny_config(total_steps=1), str(tmp_path / 'wd'), progress=False)
  assert cli.main(['export', f'--workdir={tmp_path / "wd"}', f'--out={tmp_path / "out"}', '--weights=ema']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'trained without an EMA' in err[0] and 'ema_decay' in err[0]


SHARD_GB = 20_000 / 2**30  # 20 kB shards: the tiny model's 0.3 MB of weights in many files


def _naive_read(path):
  """The weights of an export directory as a transformers-style reader finds them: the index's
  weight_map, each shard read with safetensors."""
  import safetensors.numpy
  with open(os.path.join(path, 'model.safetensors.index.json')) as f:
    index = json.load(f)
  return index, {name: safetensors.numpy.load_file(os.path.join(path, file))[name]
                 for name, file in index['weight_map'].items()}


def test_a_large_model_is_written_as_shards_with_an_index(trained):
  whole = _export(trained, 'float32', '--dtype=float32')
  sharded = _export(trained, 'sharded', f'--max_shard_gb={SHARD_GB}')
  files = sorted(f for f in os.listdir(sharded) if f.endswith('.safetensors'))
  assert 'model.safetensors' not in files and len(files) > 5
  assert files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  index, weights = _naive_read(sharded)
  import safetensors.numpy
  want = safetensors.numpy.load_file(os.path.join(whole, 'model.safetensors'))
  assert sorted(weights) == sorted(want) and index['metadata']['total_size'] == sum(x.nbytes for x in want.values())
  for name, x in want.items():
    np.testing.assert_array_equal(weights[name], x)
  assert max(os.path.getsize(os.path.join(sharded, f)) for f in files) < 2 * 20_000 + max(x.nbytes for x in want.values())
  enc = vlp.load_pretrained(sharded)
  np.testing.assert_array_equal(enc.encode_image(trained['image']), vlp.load_pretrained(whole).encode_image(trained['image']))


def test_two_processes_export_like_one_each_writing_its_shards(trained, tmp_path):
  """`vlp export` in 2 processes x 4 devices (jax.distributed): every process restores its own part
  of the params and writes every other shard; the files equal one process's, byte for byte."""
  import portpicker
  one = _export(trained, 'sharded', f'--max_shard_gb={SHARD_GB}')
  two = str(tmp_path / 'two')
  port = portpicker.pick_unused_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
  procs = [subprocess.Popen([sys.executable, '-m', 'vlp.cli', 'export', f'--workdir={trained["wd"]}', f'--out={two}',
                             f'--max_shard_gb={SHARD_GB}', f'--coordinator=localhost:{port}', '--num_processes=2',
                             f'--process_id={i}'], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(vlp.__file__))))
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert 'exported to' in outs[0] and 'exported to' not in outs[1]  # process 0 reports
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  for f in os.listdir(one):
    if f.endswith(('.safetensors', '.json')):
      with open(os.path.join(one, f), 'rb') as a, open(os.path.join(two, f), 'rb') as b:
        assert a.read() == b.read(), f
