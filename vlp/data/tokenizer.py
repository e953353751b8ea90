"""SentencePiece tokenizer: train, load, and lay out text for the encoders.

Every model trained here has the same special ids, which the models and MLM
masking rely on: [PAD]=0, [UNK]=1, [CLS]=2 (as BOS), [SEP]=3 (as EOS) and
[MASK]=4. It is BPE with byte fallback, so any text can be encoded without
[UNK]: characters outside the training corpus become UTF-8 byte pieces.

Ship a new built-in model with
  python -m vlp.data.tokenizer --out vlp/data/assets/synthetic_sp1024 \
      --vocab_size 1024 --synthetic 20000
and train one for a real corpus (WIT: 100+ languages) from its ArrayRecord
files with
  vlp data tokenizer --out sp32k --vocab_size 32000 --records wit/ \
      --max_sentences 5000000
"""
import argparse
from collections.abc import Iterable, Sequence
import os
import random

import grain
import numpy as np
import sentencepiece as spm

from vlp.core import paths
from vlp.core.config import ConfigError
from vlp.data import arrayrecord, records, synthetic

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
  merges are picked by frequency. A large corpus is sampled before, with a
  seed (sample_records, sample_lines), rather than by SentencePiece's
  input_sentence_size, whose shuffle is random unless a process-wide seed is
  set. character_coverage 0.9995 suits many scripts at once (WIT's 100+
  languages): the rarest characters, mostly CJK, become byte pieces instead
  of taking vocabulary.
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
    with paths.open(model_path, 'rb') as f:  # local or remote (gs://)
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

  @property
  def special_ids(self) -> tuple[int, ...]:
    """The ids MLM never selects: [PAD], [UNK], [CLS], [SEP], [MASK]."""
    return (self.pad_id, self._sp.unk_id(), self.cls_id, self.sep_id, self.mask_id)

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


def sample_lines(path: str, max_sentences: int, held_out: int = 1000,
                 seed: int = 0) -> tuple[list[str], list[str]]:
  """(training, held-out) captions of a text file, one per non-blank line.

  A reservoir sample: the file is read once, line by line, and never held
  whole; the same file, sizes and seed give the same sample.
  """
  keep = max_sentences + held_out
  rng, reservoir, n = random.Random(seed), [], 0
  with paths.open(path, encoding='utf-8') as f:
    for line in f:
      if not line.strip():
        continue
      if len(reservoir) < keep:
        reservoir.append(line.rstrip('\n'))
      elif (j := rng.randrange(n + 1)) < keep:
        reservoir[j] = line.rstrip('\n')
      n += 1
  rng.shuffle(reservoir)  # the first lines of a small file are not the held-out ones
  h = _num_held_out(n, held_out)
  return reservoir[h:h + max_sentences], reservoir[:h]


def sample_records(paths: str | Sequence[str], max_sentences: int,
                   held_out: int = 1000, seed: int = 0) -> tuple[list[str], list[str]]:
  """(training, held-out) captions of ArrayRecord files written by vlp.

  Records are drawn at random by index, so only the sampled ones are read
  (each holds its image too: reading a whole corpus to sample it would read
  terabytes). The draw is seeded and the same for the same files. Records
  that do not decode, and empty captions, are left out.
  """
  data = grain.sources.ArrayRecordDataSource(arrayrecord.expand(paths))
  n = len(data)
  h = _num_held_out(n, held_out)
  drawn = random.Random(seed).sample(range(n), min(n, max_sentences + h))
  # Sorted: neighbouring entries are read together, file by file.
  return _captions(data, sorted(drawn[h:])), _captions(data, sorted(drawn[:h]))


def _num_held_out(n: int, held_out: int) -> int:
  # Never more than a tenth of a small corpus: most of it trains.
  return min(held_out, n // 10)


def _captions(data, indices: list[int], chunk: int = 1024) -> list[str]:
  out = []
  for start in range(0, len(indices), chunk):
    for raw in data.__getitems__(indices[start:start + chunk]):
      record = records.decode(raw)
      if not records.is_skipped(record) and record['caption'].strip():
        out.append(record['caption'])
  return out


def byte_fallback_fraction(tokenizer: Tokenizer, texts: Sequence[str]) -> float:
  """The fraction of the pieces of texts that are UTF-8 byte pieces: text
  the vocabulary does not cover (a language or script it saw too little of)."""
  sp = tokenizer._sp
  pieces = [i for text in texts for i in sp.encode(text)]
  return sum(sp.is_byte(i) for i in pieces) / max(len(pieces), 1)


def builtin_tokenizer(vocab_size: int = 1024) -> Tokenizer:
  """The shipped tokenizer of the synthetic dataset."""
  path = os.path.join(ASSETS_DIR, f'synthetic_sp{vocab_size}.model')
  if not os.path.exists(path):
    shipped = sorted(f for f in os.listdir(ASSETS_DIR) if f.endswith('.model'))
    raise FileNotFoundError(f'No built-in tokenizer with vocab_size='
                            f'{vocab_size}; shipped: {shipped}')
  return Tokenizer(path)


def for_config(config) -> Tokenizer:
  """The tokenizer `config.data.tokenizer` names ('builtin', a SentencePiece .model path, or a
  BERT-style tokenizer.json: a BERT import's WordPiece vocabulary), checked against the model's
  vocabulary."""
  name = config.data.tokenizer
  if name.endswith('.json'):
    from vlp.data import hub_tokenizer
    try:
      t = hub_tokenizer.BertTokenizer(name)
    except ValueError as e:
      raise ConfigError(f"config key 'data.tokenizer': {e}") from None
  else:
    t = builtin_tokenizer() if name == 'builtin' else Tokenizer(name)
  if t.vocab_size > config.model.text.vocab_size:
    raise ConfigError(f"config key 'model.text.vocab_size': {config.model.text.vocab_size} is smaller "
                      f'than the tokenizer vocabulary ({t.vocab_size})')
  return t


def main(argv: Sequence[str] | None = None) -> str:
  """`vlp data tokenizer`: trains a model, prints its path, a summary and examples."""
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
  corpus.add_argument('--records', metavar='DIR_OR_GLOB',
                      help='captions of ArrayRecord files written by vlp '
                           '(a directory, a glob, or several separated by commas)')
  parser.add_argument('--max_sentences', type=int, default=2_000_000,
                      help='--captions/--records: train on a seeded random sample this large')
  parser.add_argument('--held_out', type=int, default=1000,
                      help='--captions/--records: more sentences, not trained on, '
                           'to measure byte fallback on')
  parser.add_argument('--seed', type=int, default=0, help='of the sample')
  args = parser.parse_args(argv)

  held_out = []
  if args.synthetic is not None:
    # All of them, none held out: this reproduces the shipped model.
    texts = list(synthetic_captions(args.synthetic))
  elif args.captions is not None:
    texts, held_out = sample_lines(args.captions, args.max_sentences, args.held_out, args.seed)
  else:
    texts, held_out = sample_records(args.records.split(','), args.max_sentences,
                                     args.held_out, args.seed)
  if not texts:
    raise SystemExit(f'no caption to train on in {args.captions or args.records}')
  path = train_tokenizer(texts, args.out, args.vocab_size)
  tokenizer = Tokenizer(path)
  print(f'{path}: vocab_size={tokenizer.vocab_size}, trained on {len(texts)} sentences')
  if held_out:
    print(f'  byte-fallback pieces on {len(held_out)} held-out sentences: '
          f'{byte_fallback_fraction(tokenizer, held_out):.2%}')
  for text in texts[:4]:
    ids = tokenizer.encode([text], 48)[0]
    print(f'  {text!r} -> {[i for i in ids.tolist() if i != tokenizer.pad_id]}')
  return path


if __name__ == '__main__':
  main()
