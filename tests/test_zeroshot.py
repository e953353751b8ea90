"""Zero-shot classification against naive loops; its data readers."""
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.eval import zeroshot


def _naive_metrics(logits, labels, num_classes):
  """Loops: rank = other classes scoring >= the true one (ties against)."""
  ranks = []
  for row, y in zip(logits, labels):
    ranks.append(sum(1 for c in range(num_classes) if c != y and row[c] >= row[y]))
  ranks = np.array(ranks)
  recalls = [np.mean([r == 0 for r, y in zip(ranks, labels) if y == c]) for c in sorted(set(labels))]
  return {'acc1': 100 * np.mean(ranks < 1), 'acc5': 100 * np.mean(ranks < 5),
          'mean_per_class_recall': 100 * np.mean(recalls)}


def test_metrics_match_naive_with_ties_and_unbalanced_classes():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, size=(60, 8)).astype(np.float32)  # many exact ties
  labels = np.concatenate([np.zeros(30, int), rng.integers(1, 7, size=30)])  # class 7 never appears
  got = zeroshot.classification_metrics(logits, labels)
  assert got == pytest.approx(_naive_metrics(logits, labels, 8))


def test_tie_counts_against_and_balanced_recall():
  logits = np.array([[1, 1, 0], [0, 2, 1], [0, 1, 2], [0, 1, 2]], np.float32)
  labels = np.array([0, 1, 2, 2])
  got = zeroshot.classification_metrics(logits, labels, ks=(1, 2))
  # sample 0 ties with class 1: a miss at top-1, a hit at top-2
  assert got == pytest.approx({'acc1': 75.0, 'acc2': 100.0, 'mean_per_class_recall': (0 + 1 + 1) / 3 * 100})


def test_class_embeddings_are_the_normalised_mean_of_normalised_templates():
  rng = np.random.default_rng(1)
  per_prompt = rng.normal(size=(3 * 4, 5))
  per_prompt /= np.linalg.norm(per_prompt, axis=1, keepdims=True)
  got = zeroshot.class_embeddings(per_prompt, 3)
  for c in range(3):
    mean = sum(per_prompt[c * 4 + t] for t in range(4)) / 4
    np.testing.assert_allclose(got[c], mean / np.sqrt(np.sum(mean ** 2)), atol=1e-6)


def test_evaluator_end_to_end_with_table_encoders():
  """Encoders that are lookups: text token t -> row t of a table, image = its own vector."""
  rng = np.random.default_rng(2)
  names = ['cat', 'dog', 'car', 'tree']
  templates = ('a {}', 'the {}', 'art of {}')
  prompts = [t.format(n) for n in names for t in templates]
  vocab = {p: i for i, p in enumerate(prompts)}
  table = rng.normal(size=(len(prompts), 6)).astype(np.float32)
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  images = rng.normal(size=(25, 6)).astype(np.float32)
  labels = rng.integers(0, 4, size=25)
  jnorm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  fns = {'image': lambda params, x: jnorm(x), 'text': lambda params, t: jnorm(params[t[:, 0]])}
  tokenize = lambda texts: np.array([[vocab[t]] for t in texts], np.int32)
  data = {'image': images, 'label': labels, 'class_names': names}
  got = dict(zeroshot.Evaluator(fns, data, tokenize, templates, batch_size=7).run(table))
  classes = []
  for c in range(4):
    mean = np.mean([norm(table[vocab[t.format(names[c])]]) for t in templates], axis=0)
    classes.append(norm(mean))
  logits = np.array([[norm(im) @ cl for cl in classes] for im in images])
  assert got == pytest.approx(_naive_metrics(logits, labels, 4), abs=1e-6)


def test_image_folder_classes_labels_and_spread(tmp_path):
  import data_fixtures as fx
  from vlp.data import folder
  for c, name in enumerate(['golden_retriever', 'tabby_cat', 'zebra']):
    (tmp_path / name).mkdir()
    for i in range(4):
      (tmp_path / name / f'{i}.jpg').write_bytes(fx.jpeg(10 * c + i))
  (tmp_path / 'zebra' / 'notes.txt').write_text('not an image')
  files, labels, names = folder.image_folder(str(tmp_path))
  assert names == ['golden retriever', 'tabby cat', 'zebra']
  assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and len(files) == 12
  _, labels, _ = folder.image_folder(str(tmp_path), limit=6)
  assert sorted(set(labels.tolist())) == [0, 1, 2]  # a subset keeps every class
