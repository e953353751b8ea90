"""ALBEF's masked-language-model inputs (vlp.recipes.albef.masking): the share of tokens chosen,
80/10/10 among [MASK], a random regular id and the token kept, special ids never chosen,
determinism by the example's generator, and the example transform the input pipeline runs."""
import math

import numpy as np

from vlp.recipes.albef import masking

VOCAB = 1000


def _captions(rows=4000, length=32, seed=0) -> np.ndarray:
  """[CLS] ids [SEP] [PAD]... rows of random lengths, as Tokenizer.encode lays them out."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((rows, length), np.int32)
  lengths = rng.integers(0, length - 1, rows)
  for row, n in zip(tokens, lengths):
    row[0], row[1:n + 1], row[n + 1] = 2, rng.integers(5, VOCAB, n), 3
  tokens[::97, 5] = 1  # [UNK] and a literal '[MASK]' in a caption
  tokens[::89, 6] = 4  # are never selected either.
  return tokens


def _bound(n, p):
  return 5 * math.sqrt(n * p * (1 - p))


def test_mlm_mask_statistics():
  tokens = _captions()
  inputs, labels = masking.mlm_mask(tokens, np.random.default_rng(0), vocab_size=VOCAB)
  assert inputs.dtype == labels.dtype == np.int32 and inputs.shape == labels.shape == tokens.shape
  special = tokens < 5
  selected = labels != -100
  np.testing.assert_array_equal(labels[selected], tokens[selected])
  np.testing.assert_array_equal(inputs[~selected], tokens[~selected])
  assert not selected[special].any()
  n, k = (~special).sum(), selected.sum()
  assert abs(k - 0.15 * n) < _bound(n, 0.15)
  chosen, original = inputs[selected], tokens[selected]
  masked, kept = chosen == 4, chosen == original
  replaced = ~masked & ~kept
  assert abs(masked.sum() - 0.8 * k) < _bound(k, 0.8)
  # A random id equal to the original counts as kept: p = 0.1 / 995 more.
  p_same = 0.1 / (VOCAB - 5)
  assert abs(replaced.sum() - (0.1 - p_same) * k) < _bound(k, 0.1)
  assert abs(kept.sum() - (0.1 + p_same) * k) < _bound(k, 0.1)
  random_ids = chosen[replaced]
  assert random_ids.min() >= 5 and random_ids.max() < VOCAB
  assert random_ids.min() < 50 and random_ids.max() > VOCAB - 50  # Spread over all.


def test_mlm_mask_is_deterministic_and_leaves_tokens_alone():
  tokens = _captions(rows=64)
  before = tokens.copy()
  a, b, c = (masking.mlm_mask(tokens, np.random.default_rng(seed), vocab_size=VOCAB)
             for seed in (3, 3, 4))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  np.testing.assert_array_equal(tokens, before)


def test_mlm_mask_never_touches_an_all_special_row():
  tokens = np.array([[2, 3, 0, 0, 0], [2, 1, 1, 3, 0]], np.int32)
  inputs, labels = masking.mlm_mask(tokens, np.random.default_rng(0), vocab_size=VOCAB, prob=1.0)
  np.testing.assert_array_equal(inputs, tokens)
  assert (labels == -100).all()


def test_mlm_random_replacements_are_regular_ids():
  tokens = np.full((50, 40), 5, np.int32)
  inputs, labels = masking.mlm_mask(tokens, np.random.default_rng(0), vocab_size=7,
                                    prob=1.0, mask_frac=0.0, random_frac=1.0)
  assert (labels == 5).all()
  assert set(np.unique(inputs)) == {5, 6}  # Never a special id such as [MASK].


def test_the_example_transform_masks_the_text_with_the_examples_generator():
  """The pipeline hands the transform each example with its own generator: the same generator
  state gives the same masking as mlm_mask on the caption alone, and the other keys stay."""
  transform = masking.MlmMasking(0.5, VOCAB)
  text = _captions(rows=1)[0]
  example = transform({'text': text, 'image': np.zeros((2, 2, 3), np.uint8)}, np.random.default_rng(7))
  inputs, labels = masking.mlm_mask(text, np.random.default_rng(7), vocab_size=VOCAB, prob=0.5)
  np.testing.assert_array_equal(example['mlm_text'], inputs)
  np.testing.assert_array_equal(example['mlm_labels'], labels)
  assert set(example) == {'text', 'image', 'mlm_text', 'mlm_labels'}
