"""SentencePiece tokenizer: special ids, layout, and the shipped model."""
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from vlp.data import synthetic, tokenizer as tokenizer_lib


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.builtin_tokenizer()


def test_special_ids(tok):
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
  assert tok.vocab_size == 1024
  sp = spm.SentencePieceProcessor(model_file=tok.model_path)
  assert [sp.id_to_piece(i) for i in range(5)] == [
      '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  # [MASK] written in text is the mask token, not its characters.
  row = tok.encode(['a [MASK] circle'], 8)[0].tolist()
  assert row.count(tok.mask_id) == 1 and tok.decode(row) == 'a [MASK] circle'


def test_layout_cls_tokens_sep_pad(tok):
  text = 'a small red circle above a large blue square'
  pieces = spm.SentencePieceProcessor(model_file=tok.model_path).encode(text)
  row = tok.encode([text, ''], 20)
  assert row.dtype == np.int32 and row.shape == (2, 20)
  n = len(pieces)
  np.testing.assert_array_equal(
      row[0], [2] + pieces + [3] + [0] * (20 - n - 2))
  np.testing.assert_array_equal(row[1], [2, 3] + [0] * 18)


def test_truncation_keeps_sep(tok):
  text = 'there is a small red circle to the left of a large blue square'
  full = tok.encode([text], 64)[0]
  short = tok.encode([text], 6)[0]
  np.testing.assert_array_equal(short, list(full[:5]) + [tok.sep_id])
  with pytest.raises(ValueError):
    tok.encode([text], 1)


def test_round_trip_and_no_unknown_pieces_in_any_language(tok):
  # Held-out scenes: the tokenizer was trained on the train split.
  scenes = synthetic.SyntheticScenes('test', num_examples=200)
  texts = [c for i in range(200) for _, c in scenes.captions(i)]
  ids = tok.encode(texts, 48)
  sp = spm.SentencePieceProcessor(model_file=tok.model_path)
  byte_pieces = {i for i in range(tok.vocab_size) if sp.is_byte(i)}
  assert len(byte_pieces) == 256
  used = set(ids.ravel().tolist())
  # Every character and word is in the vocabulary: no [UNK], no byte pieces.
  assert sp.unk_id() not in used and not used & byte_pieces
  assert (ids == tok.sep_id).sum(axis=1).tolist() == [1] * len(texts)
  assert [tok.decode(row) for row in ids] == texts


def test_unseen_characters_fall_back_to_bytes(tok):
  text = 'a photo of a 赤 circle'
  ids = tok.encode([text], 32)[0]
  assert 1 not in ids.tolist() and tok.decode(ids) == text


def test_pickle_round_trip(tok):
  # Grain worker processes get the tokenizer by pickling.
  clone = pickle.loads(pickle.dumps(tok))
  texts = ['ein kleiner roter Kreis', 'une grande étoile bleue']
  np.testing.assert_array_equal(clone.encode(texts, 12), tok.encode(texts, 12))


def test_retraining_reproduces_the_shipped_model(tmp_path, capsys):
  path = tokenizer_lib.main([
      '--out', str(tmp_path / 'sp'), '--vocab_size', '1024',
      '--synthetic', str(tokenizer_lib.BUILTIN_NUM_SCENES)])
  assert path in capsys.readouterr().out
  shipped = spm.SentencePieceProcessor(
      model_file=tokenizer_lib.builtin_tokenizer().model_path)
  retrained = spm.SentencePieceProcessor(model_file=path)
  def vocab(sp):
    return [(sp.id_to_piece(i), sp.get_score(i))
            for i in range(sp.vocab_size())]
  assert vocab(retrained) == vocab(shipped)


def test_small_corpus_from_file(tmp_path):
  # A corpus too small for vocab_size gets a smaller vocabulary, same ids.
  captions = tmp_path / 'captions.txt'
  captions.write_text('a cat on a mat\nzwei Hunde im Park\n' * 50,
                      encoding='utf-8')
  path = tokenizer_lib.main(['--out', str(tmp_path / 'sp'), '--vocab_size',
                             '5000', '--captions', str(captions)])
  tok = tokenizer_lib.Tokenizer(path)
  assert os.path.exists(path) and tok.vocab_size < 5000
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
  assert tok.decode(tok.encode(['zwei Hunde'], 8)[0]) == 'zwei Hunde'


def test_missing_builtin_size():
  with pytest.raises(FileNotFoundError, match='synthetic_sp1024.model'):
    tokenizer_lib.builtin_tokenizer(vocab_size=7)


def test_cli_trains_a_tokenizer(tmp_path):
  from vlp import cli
  prefix = str(tmp_path / 'sp')
  assert cli.main(['data', 'tokenizer', '--out', prefix, '--vocab_size', '400', '--synthetic', '300']) == 0
  tok = tokenizer_lib.Tokenizer(prefix + ".model")
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
