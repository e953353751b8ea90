"""A source model's own tokenizer, as transformers' and open_clip's hub directories ship it:
`tokenizer.json` (the `tokenizers` library's format: normaliser, pre-tokeniser, vocabulary and
the post-processor that adds the start and end tokens), or SigLIP's SentencePiece model
`spiece.model` (transformers' SiglipTokenizer; big_vision's, given to `vlp import --tokenizer`).

`vlp import` carries these files into the export and `vlp export --format=hf` carries them
on, so `vlp.load_pretrained(DIR).encode_text` takes strings tokenised as the source does. A
BERT-style file ([CLS], [SEP], [MASK], [PAD] = 0) also tokenises training captions
(`data.tokenizer=.../tokenizer.json`): ALBEF's text stack started from a BERT import reads
captions in BERT's WordPiece vocabulary, masked for MLM by BERT's own [MASK].
"""
import json
import re
import string

import numpy as np

from vlp.core import paths

FILE, SPIECE = 'tokenizer.json', 'spiece.model'
FILES = (FILE, SPIECE, 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt')  # what travels on
BERT_TOKENS = {'bos_id': '[CLS]', 'eos_id': '[SEP]', 'pad_id': '[PAD]', 'mask_id': '[MASK]', 'unk_id': '[UNK]'}


def copy_files(src: str, out: str) -> list[str]:
  """Copies the tokenizer files src has into out; the names copied."""
  copied = [name for name in FILES if paths.exists(paths.join(src, name))]
  for name in copied:
    paths.copy(paths.join(src, name), paths.join(out, name))
  return copied


def _added_tokens(text: str) -> dict:
  """{content: id} of a tokenizer.json's special added tokens."""
  return {t['content']: t['id'] for t in json.loads(text).get('added_tokens', []) if t.get('special', True)}


def special_ids(path: str) -> dict:
  """BERT's special ids in a tokenizer.json ({'bos_id': [CLS]'s, 'eos_id': [SEP]'s, ...}), the
  ones it has."""
  added = _added_tokens(paths.read_text(path))
  return {key: added[name] for key, name in BERT_TOKENS.items() if name in added}


def _rows(captions: list, max_len: int, eos_id: int, pad_id: int) -> np.ndarray:
  """int32 [B, max_len] of captions' ids (each ending in its end token): a longer one cut with the
  end token kept last (as open_clip and transformers cut), the rest padded with pad_id."""
  ids = np.full((len(captions), max_len), pad_id, np.int32)
  for row, tokens in zip(ids, captions):
    tokens = tokens if len(tokens) <= max_len else tokens[:max_len - 1] + [eos_id]
    row[:len(tokens)] = tokens
  return ids


class HubTokenizer:
  """Captions -> int32 [B, max_len] as the source model reads them: the file's own layout
  (its post-processor adds the start and end tokens), cut to max_len with the end token kept
  last (as open_clip and transformers cut), padded with pad_id (0: vlp masks it; SigLIP
  attends to its padding, so any id serves). eos_id None: the file's [SEP]."""

  def __init__(self, path: str, eos_id: int | None = None, pad_id: int = 0):
    self.model_path = path
    self._load(paths.read_text(path))
    ids = special_ids(path) if eos_id is None else {}
    if eos_id is None and 'eos_id' not in ids:
      raise ValueError(f'{path}: no [SEP] token to end captions with; give the end-of-text id')
    self.eos_id, self.pad_id = ids.get('eos_id', eos_id), pad_id

  def _load(self, text: str):
    import tokenizers  # the hub format's own library
    self._text = text
    self._tok = tokenizers.Tokenizer.from_str(text)
    self._tok.no_padding()
    self._tok.no_truncation()

  # Grain worker processes receive the tokenizer by pickling; it is rebuilt there from its JSON.
  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_tok'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load(state['_text'])

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, texts, max_len: int) -> np.ndarray:
    return _rows([e.ids for e in self._tok.encode_batch(list(texts))], max_len, self.eos_id, self.pad_id)


class BertTokenizer(HubTokenizer):
  """A BERT-style tokenizer.json with what vlp's training needs of a tokenizer (vlp.data.tokenizer):
  [PAD] = 0 (vlp masks id 0), [CLS] and [SEP] (the text tower pools at them), [MASK] (MLM),
  and every special id, which MLM never selects."""

  def __init__(self, path: str):
    ids = special_ids(path)
    missing = [BERT_TOKENS[k] for k in ('bos_id', 'eos_id', 'pad_id', 'mask_id') if k not in ids]
    if missing or ids['pad_id'] != 0:
      raise ValueError(f'{path}: a training tokenizer needs {", ".join(BERT_TOKENS.values())} with [PAD] = 0 '
                       f'(missing: {missing or "none"}; [PAD] = {ids.get("pad_id")})')
    super().__init__(path, ids['eos_id'], 0)
    self.cls_id, self.sep_id, self.mask_id = ids['bos_id'], ids['eos_id'], ids['mask_id']
    self.special_ids = tuple(sorted(_added_tokens(self._text).values()))

  def decode(self, ids) -> str:
    keep = [i for i in np.asarray(ids).tolist() if i not in self.special_ids]
    return self._tok.decode(keep)


class SentencePieceTokenizer:
  """SigLIP's captions: the SentencePiece pieces of the text, then EOS, cut to max_len with EOS
  kept last, padded with pad_id. `canonical` (transformers' SiglipTokenizer): punctuation
  removed, whitespace collapsed, and lower-cased where `lower`; big_vision's tokenizer takes
  the text as it is."""

  def __init__(self, path: str, eos_id: int, pad_id: int, canonical: bool = False, lower: bool = False):
    self.model_path, self.eos_id, self.pad_id = path, eos_id, pad_id
    self.canonical, self.lower = canonical, lower
    self._proto = paths.read_bytes(path)
    self._load()

  def _load(self):
    import sentencepiece as spm
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != '_sp'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  def _text(self, text: str) -> str:
    if not self.canonical:
      return text
    text = (text.lower() if self.lower else text).translate(str.maketrans('', '', string.punctuation))
    return re.sub(r'\s+', ' ', text).strip()

  def encode(self, texts, max_len: int) -> np.ndarray:
    return _rows([self._sp.encode(self._text(t)) + [self.eos_id] for t in texts], max_len, self.eos_id,
                 self.pad_id)


def siglip_options(src: str) -> dict:
  """How transformers' SiglipTokenizer of a directory reads text (its tokenizer_config.json)."""
  config = paths.join(src, 'tokenizer_config.json')
  lower = json.loads(paths.read_text(config)).get('do_lower_case', True) if paths.exists(config) else True
  return {'canonical': True, 'lower': lower}


def for_export(path: str, tokens: dict):
  """The tokenizer an export or import directory ships (None when it has none of these files):
  its tokenizer.json, or its spiece.model read as `tokens` (config.json) says."""
  if paths.exists(paths.join(path, FILE)):
    return HubTokenizer(paths.join(path, FILE), tokens.get('eos_id'), tokens.get('pad_id', 0))
  if paths.exists(paths.join(path, SPIECE)):
    return SentencePieceTokenizer(paths.join(path, SPIECE), tokens['eos_id'], tokens.get('pad_id', 0),
                                  tokens.get('canonical', False), tokens.get('lower', False))
  return None
