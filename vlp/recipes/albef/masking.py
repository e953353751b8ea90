"""ALBEF's masked-language-model inputs, made per example in the input pipeline (the recipe's
example transform: vlp.recipes.base.Recipe.example_transform), with the example's own random
generator, so a resumed run masks exactly as it would have."""
import numpy as np

# Fixed special ids of vlp's own tokenizers (vlp.data.tokenizer): [PAD]=0,
# [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; regular tokens come after them.
MASK_ID = 4
SPECIAL_IDS = (0, 1, 2, 3, 4)
# Label of positions the MLM loss skips (PyTorch's cross-entropy default,
# which ALBEF's and BERT's released code rely on).
IGNORE_INDEX = -100


def mlm_mask(tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
             mask_id: int = MASK_ID, special_ids: tuple[int, ...] = SPECIAL_IDS,
             prob: float = 0.15, mask_frac: float = 0.8,
             random_frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """BERT/ALBEF masked-language-model inputs and labels of int32 [..., L] ids.

  Every position whose id is not special ([PAD], [CLS], [SEP]...) is
  selected independently with probability `prob`. Of the selected, a
  `mask_frac` share becomes mask_id, a `random_frac` share a uniform random
  regular id (those above every special id, which lead the vocabulary), and
  the rest keep their id, so the model must predict every token it sees,
  not only the masked ones. labels hold the original id at selected positions
  and IGNORE_INDEX (-100) elsewhere, the positions the loss skips. Returns
  (inputs, labels), both int32 and shaped like tokens.
  """
  tokens = np.asarray(tokens, np.int32)
  selected = (rng.random(tokens.shape) < prob) & ~np.isin(tokens, special_ids)
  action = rng.random(tokens.shape)
  random_ids = rng.integers(max(special_ids) + 1, vocab_size, tokens.shape,
                            dtype=np.int32)
  inputs = np.where(action < mask_frac, np.int32(mask_id),
                    np.where(action < mask_frac + random_frac, random_ids, tokens))
  inputs = np.where(selected, inputs, tokens)
  labels = np.where(selected, tokens, np.int32(IGNORE_INDEX))
  return inputs, labels


class MlmMasking:
  """example -> example with 'mlm_text' and 'mlm_labels' (mlm_mask of its 'text'); a class, not
  a closure, so Grain can pickle it into its workers."""

  def __init__(self, prob: float, vocab_size: int, mask_id: int = MASK_ID, special_ids=SPECIAL_IDS):
    self.prob, self.vocab_size, self.mask_id, self.special_ids = prob, vocab_size, mask_id, tuple(special_ids)

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    example['mlm_text'], example['mlm_labels'] = mlm_mask(
        example['text'], rng, vocab_size=self.vocab_size, mask_id=self.mask_id, special_ids=self.special_ids,
        prob=self.prob)
    return example
