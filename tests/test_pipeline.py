"""Grain pipelines: batches, determinism, resumption, process sharding."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import vlp
from vlp.core.pixels import model_input, normalize_image
from vlp.data import pipeline, synthetic, tokenizer as tokenizer_lib

# The configuration of the resumption test, also run in a new process.
CONFIG = dict(num_examples=40, image_size=16, batch_size=4, context_length=32,
              seed=5)
BUILD = textwrap.dedent('''
    from vlp.data import pipeline, synthetic, tokenizer

    def build(num_examples, image_size, batch_size, context_length, seed):
      source = synthetic.SyntheticScenes(num_examples=num_examples,
                                         image_size=image_size)
      return pipeline.train_dataset(
          source, tokenizer.builtin_tokenizer(), batch_size=batch_size,
          context_length=context_length, seed=seed)
''')
exec(BUILD)  # Defines build(**CONFIG) here exactly as in the new process.


class IndexedSource:
  """Example i: every pixel is i, so a batch tells which examples it holds."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((2, 2, 3), i, np.uint8), 'caption': f'item {i}'}


def indices(batch):
  return batch['image'][:, 0, 0, 0].astype(int).tolist()


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b, keys=('image', 'text')):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in keys:
      np.testing.assert_array_equal(x[k], y[k])


def rows(batches):
  """The examples of some batches as a sorted list of (caption tokens, image bytes)."""
  return sorted((tuple(t), i.tobytes()) for b in batches for t, i in zip(b['text'], b['image']))


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.builtin_tokenizer()


def test_normalize_image_on_the_host_and_in_a_compiled_function():
  import jax
  pixels = np.array([[[0, 127, 255]]], np.uint8)
  for out in (normalize_image(pixels), jax.jit(model_input)(pixels)):
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-1, -0.5 / 127.5, 1]]], rtol=1e-6)
  tokens = np.array([[2, 7, 3]], np.int32)  # anything but pixels passes through
  np.testing.assert_array_equal(jax.jit(model_input)(tokens), tokens)


def test_batch_shapes_and_content(tok):
  source = synthetic.SyntheticScenes(num_examples=30, image_size=16)
  ds = pipeline.train_dataset(source, tok, batch_size=8, context_length=32,
                              seed=0)
  batch = next(iter(ds))
  assert batch['image'].shape == (8, 16, 16, 3)
  assert batch['image'].dtype == np.uint8  # normalised on the device, in the step
  assert batch['text'].shape == (8, 32) and batch['text'].dtype == np.int32
  # Rows are examples of the source, image and caption of the same index.
  captions = {source[i]['caption']: i for i in range(len(source))}
  for image, text in zip(batch['image'], batch['text']):
    i = captions[tok.decode(text)]
    np.testing.assert_array_equal(image, source[i]['image'])


def test_same_seed_same_batches(tok):
  a = take(iter(build(**CONFIG)), 4)
  assert_same_batches(a, take(iter(build(**CONFIG)), 4))
  other = take(iter(build(**{**CONFIG, 'seed': 6})), 4)
  assert not np.array_equal(a[0]['text'], other[0]['text'])


def test_processes_read_disjoint_shares_covering_each_epoch(tok):
  n, batch_size = 24, 4  # One epoch: 3 batches per process.
  shares = []
  for process_index in range(2):
    ds = pipeline.train_dataset(
        IndexedSource(n), tok, batch_size=batch_size, context_length=8,
        seed=1, process_index=process_index, process_count=2)
    batches = take(iter(ds), 6)
    shares.append([[i for b in batches[e * 3:(e + 1) * 3] for i in indices(b)]
                   for e in range(2)])
  for epoch in range(2):
    first, second = shares[0][epoch], shares[1][epoch]
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(n))
  # A new permutation every epoch.
  assert shares[0][0] + shares[1][0] != shares[0][1] + shares[1][1]


def test_workers_share_the_same_example_stream(tok):
  # Worker w batches examples w, w+W, w+2W... of the one-process stream, and
  # batches come from the workers in turn: W batches hold the same examples.
  expected = take(iter(build(**CONFIG)), 6)
  for attempt in range(2):  # and the same batches on every run
    iterator = pipeline.make_iterator(build(**CONFIG), num_workers=2, prefetch=2)
    try:
      got = take(iterator, 6)
    finally:
      iterator.close()
    if attempt:
      assert_same_batches(got, first)
    first = got
    for i in range(0, 6, 2):
      assert rows(got[i:i + 2]) == rows(expected[i:i + 2])
    assert got[0]['skipped'] == {}


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_in_a_new_process(tmp_path, num_workers):
  iterator = pipeline.make_iterator(build(**CONFIG), num_workers, prefetch=2)
  take(iterator, 3)
  # What a checkpoint stores; 13 batches on, the epoch (10 batches) wraps.
  state = json.dumps(iterator.get_state())
  take(iterator, 10)
  state_later = json.dumps(iterator.get_state())
  expected = take(iterator, 3)
  iterator.close()

  script = BUILD + textwrap.dedent('''
      import json, sys
      import numpy as np
      if __name__ == '__main__':
        config, num_workers, state, out = sys.argv[1:]
        iterator = pipeline.make_iterator(
            build(**json.loads(config)), int(num_workers), prefetch=2)
        iterator.set_state(json.loads(state))
        batches = [next(iterator) for _ in range(13)]
        iterator.close()
        np.savez(out, **{f'{k}{i}': b[k] for i, b in enumerate(batches)
                         for k in b})
  ''')
  out = tmp_path / 'batches.npz'
  root = os.path.dirname(os.path.dirname(vlp.__file__))
  env = {**os.environ,
         'PYTHONPATH': os.pathsep.join([root, os.environ.get('PYTHONPATH', '')])}
  subprocess.run([sys.executable, '-c', script, json.dumps(CONFIG),
                  str(num_workers), state, str(out)], check=True, env=env,
                 timeout=120)
  with np.load(out) as f:
    resumed = [{k: f[f'{k}{i}'] for k in ('image', 'text')} for i in range(13)]
  assert_same_batches(resumed[10:], expected)
  assert state != state_later
