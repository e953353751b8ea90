"""SentencePiece tokenizer: train, load, and lay out text for the encoders.

Every model trained here has the same special ids, which the models and MLM
masking rely on: [PAD]=0, [UNK]=1, [CLS]=2 (as BOS), [SEP]=3 (as EOS) and
[MASK]=4. It is BPE with byte fallback, so any text can be encoded without
[UNK]: characters outside the training corpus become UTF-8 byte pieces.

Ship a new built-in model with
  python -m vlp.data.tokenizer --out vlp/data/assets/synthetic_sp1024 \
      --vocab_size 1024 --synthetic 20000
"""
import argparse
from collections.abc import Iterable, Sequence
import os

import numpy as np
import sentencepiece as spm

from vlp.data import synthetic

PAD, UNK, CLS, SEP, MASK = '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'
ASSETS_DIR = os.path.join(os.path.dirname(__file__), 'assets')
# Scenes of the synthetic train split whose captions (all four languages)
# trained the shipped model.
BUILTIN_NUM_SCENES = 20_000


def train_tokenizer(texts: Iterable[str], model_prefix: str,
                    vocab_size: int) -> str:
  """Trains a BPE model on texts; returns the path of `model_prefix.model`.

  vocab_size is an upper bound: a corpus with too few distinct words for it
  (SentencePiece would refuse) gets the largest vocabulary it supports.
  Training is deterministic: every sentence is used (no sampling) and BPE
  merges are picked by frequency.
  """
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      model_type='bpe',
      byte_fallback=True,
      character_coverage=0.9995,
      pad_id=0, pad_piece=PAD,
      unk_id=1, unk_piece=UNK,
      bos_id=2, bos_piece=CLS,
      eos_id=3, eos_piece=SEP,
      user_defined_symbols=[MASK],  # Gets the next free id: 4.
      minloglevel=2,
  )
  return model_prefix + '.model'


class Tokenizer:
  """Encodes captions as [CLS] tokens [SEP] [PAD]... rows of int32 ids."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    with open(model_path, 'rb') as f:
      self._load(f.read())

  def _load(self, proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    self.mask_id = self._sp.piece_to_id(MASK)
    if self.mask_id == self._sp.unk_id() or self._sp.pad_id() < 0:
      raise ValueError(f'{self.model_path} has no {MASK} or {PAD} piece: '
                       'train it with vlp.data.tokenizer.train_tokenizer')

  # Grain worker processes receive the tokenizer by pickling; the C++
  # processor is rebuilt there from the serialized model.
  def __getstate__(self):
    return {'model_path': self.model_path,
            'proto': self._sp.serialized_model_proto()}

  def __setstate__(self, state):
    self.model_path = state['model_path']
    self._load(state['proto'])

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def cls_id(self) -> int:
    return self._sp.bos_id()

  @property
  def sep_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]; long texts lose their last tokens."""
    if max_len < 2:
      raise ValueError(f'max_len={max_len} leaves no room for [CLS] [SEP]')
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, text in zip(ids, texts):
      # One string at a time: encoding a list starts a thread pool per call,
      # which costs more than the encoding of a short caption.
      tokens = self._sp.encode(text)[:max_len - 2]
      row[0] = self.cls_id
      row[1:len(tokens) + 1] = tokens
      row[len(tokens) + 1] = self.sep_id
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one row: the tokens between [CLS] and the first [SEP]."""
    tokens = []
    for i in np.asarray(ids).tolist():
      if i == self.sep_id:
        break
      if i not in (self.pad_id, self.cls_id):
        tokens.append(i)
    return self._sp.decode(tokens)

  def pieces(self) -> list[str]:
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


def synthetic_captions(num_scenes: int) -> Iterable[str]:
  """Captions in every language of the first scenes of the synthetic train
  split: the corpus of the built-in tokenizer."""
  scenes = synthetic.SyntheticScenes('train', num_examples=num_scenes)
  for i in range(num_scenes):
    for _, caption in scenes.captions(i):
      yield caption


def builtin_tokenizer(vocab_size: int = 1024) -> Tokenizer:
  """The shipped tokenizer of the synthetic dataset."""
  path = os.path.join(ASSETS_DIR, f'synthetic_sp{vocab_size}.model')
  if not os.path.exists(path):
    shipped = sorted(f for f in os.listdir(ASSETS_DIR) if f.endswith('.model'))
    raise FileNotFoundError(f'No built-in tokenizer with vocab_size='
                            f'{vocab_size}; shipped: {shipped}')
  return Tokenizer(path)


def main(argv: Sequence[str] | None = None) -> str:
  """`vlp data tokenizer`: trains a model, prints its path and examples."""
  parser = argparse.ArgumentParser(
      prog='vlp data tokenizer', description=main.__doc__)
  parser.add_argument('--out', required=True,
                      help='model prefix: writes PREFIX.model, PREFIX.vocab')
  parser.add_argument('--vocab_size', type=int, default=1024)
  corpus = parser.add_mutually_exclusive_group(required=True)
  corpus.add_argument('--synthetic', type=int, metavar='N_SCENES',
                      help='captions of the first synthetic train scenes')
  corpus.add_argument('--captions', metavar='FILE.txt',
                      help='one caption per line')
  args = parser.parse_args(argv)

  if args.synthetic is not None:
    texts = list(synthetic_captions(args.synthetic))
  else:
    with open(args.captions, encoding='utf-8') as f:
      texts = [line.rstrip('\n') for line in f if line.strip()]
  path = train_tokenizer(texts, args.out, args.vocab_size)
  tokenizer = Tokenizer(path)
  print(f'{path}: vocab_size={tokenizer.vocab_size}')
  for text in texts[:4]:
    ids = tokenizer.encode([text], 48)[0]
    print(f'  {text!r} -> {[i for i in ids.tolist() if i != tokenizer.pad_id]}')
  return path


if __name__ == '__main__':
  main()
