"""A source model's own tokenizer, as transformers' and open_clip's hub directories ship it:
`tokenizer.json` (the `tokenizers` library's format: normaliser, pre-tokeniser, vocabulary and
the post-processor that adds the start and end tokens).

`vlp import` carries these files into the export and `vlp export --format=hf` carries them
on, so `vlp.load_pretrained(DIR).encode_text` takes strings tokenised as the source does.
"""
import numpy as np

from vlp import paths

FILE = 'tokenizer.json'
FILES = (FILE, 'tokenizer_config.json', 'special_tokens_map.json')  # what travels with the weights


def copy_files(src: str, out: str) -> list[str]:
  """Copies the tokenizer files src has into out; the names copied."""
  copied = [name for name in FILES if paths.exists(paths.join(src, name))]
  for name in copied:
    paths.copy(paths.join(src, name), paths.join(out, name))
  return copied


class HubTokenizer:
  """Captions -> int32 [B, max_len] as the source model reads them: the file's own layout
  (its post-processor adds the start and end tokens), cut to max_len with the end token kept
  last (as open_clip cuts), padded with pad_id (0: vlp masks it; SigLIP attends to its
  padding, so any id serves)."""

  def __init__(self, path: str, eos_id: int, pad_id: int = 0):
    import tokenizers  # the hub format's own library
    self._tok = tokenizers.Tokenizer.from_str(paths.read_text(path))
    self._tok.no_padding()
    self._tok.no_truncation()
    self.eos_id, self.pad_id = eos_id, pad_id

  def encode(self, texts, max_len: int) -> np.ndarray:
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    for row, encoding in zip(ids, self._tok.encode_batch(list(texts))):
      tokens = encoding.ids
      if len(tokens) > max_len:
        tokens = tokens[:max_len - 1] + [self.eos_id]
      row[:len(tokens)] = tokens
    return ids
