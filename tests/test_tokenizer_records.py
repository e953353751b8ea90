"""A multilingual tokenizer trained from the captions of vlp ArrayRecord files."""
from array_record.python import array_record_module
import pytest
import sentencepiece as spm

from vlp.data import arrayrecord, records, tokenizer as tokenizer_lib

# Short captions in six scripts (and a few languages of some), as WIT has.
CAPTIONS = {
    'en': ['A red bicycle leans against a stone wall.',
           'Two children are playing football in the park.'],
    'de': ['Ein alter Leuchtturm an der Küste bei Sonnenuntergang.',
           'Eine Katze schläft auf dem Fensterbrett.'],
    'es': ['Un mercado lleno de frutas y verduras frescas.',
           'La catedral de la ciudad vista desde el río.'],
    'fr': ['Une petite maison au bord du lac en hiver.',
           'Le train arrive à la gare sous la pluie.'],
    'ru': ['Старый деревянный дом в деревне.', 'Собака бежит по снегу в лесу.',
           'Дети катаются на коньках во дворе.'],
    'uk': ['Київ вночі з висоти пташиного польоту.'],
    'bg': ['Църква в центъра на София.'],
    'el': ['Ένα μικρό λευκό σπίτι στη Σαντορίνη.', 'Ο Παρθενώνας στην Ακρόπολη της Αθήνας.',
           'Ψαράδικα σκάφη στο λιμάνι το πρωί.', 'Μια γάτα κάθεται σε ένα μπλε παράθυρο.'],
    'ar': ['منظر للمسجد الكبير في المدينة.', 'قارب صغير على شاطئ البحر.',
           'سوق قديم مليء بالتوابل.', 'جمل يقف في الصحراء عند الغروب.'],
    'zh': ['一只猫坐在窗台上', '北京的故宫在雪中'],
    'ja': ['夕方の東京タワー', '桜の木の下で花見をする人々', '山の上にある古い寺'],
    'ko': ['서울의 밤거리 풍경'],
    'hi': ['नदी के किनारे एक पुराना मंदिर।', 'बच्चे मैदान में क्रिकेट खेल रहे हैं।',
           'शाम को ताजमहल का दृश्य।'],
    'mr': ['मुंबईतील समुद्रकिनारा.'],
}
ALL = [(lang, c) for lang, cs in CAPTIONS.items() for c in cs]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A directory of two files: every caption three times (as if from three
  images), then a damaged entry and an empty caption, which are left out."""
  root = tmp_path_factory.mktemp('records')
  recs = [records.make(f'{lang}/{copy}/{i}', b'image %d' % i, caption, lang)
          for copy in range(3) for i, (lang, caption) in enumerate(ALL)]
  arrayrecord.write(str(root / 'a.array_record'), recs[:50])
  arrayrecord.write(str(root / 'b.array_record'), recs[50:])
  writer = array_record_module.ArrayRecordWriter(str(root / 'c.array_record'), 'group_size:1')
  writer.write(b'\xff\xff\xff\xff not a record')
  writer.write(records.encode(records.make('empty', b'image', ' ')))
  writer.close()
  return root


def test_trains_on_every_script_and_round_trips(corpus, tmp_path, capsys):
  path = tokenizer_lib.main(['--out', str(tmp_path / 'sp'), '--vocab_size', '1000',
                             '--records', str(corpus)])
  out = capsys.readouterr().out
  tok = tokenizer_lib.Tokenizer(path)
  sp = spm.SentencePieceProcessor(model_file=path)
  assert [sp.id_to_piece(i) for i in range(5)] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
  # Every usable record is drawn: a tenth of them held out, the rest trained on.
  train, held = tokenizer_lib.sample_records(str(corpus), 10**6)
  assert len(train) + len(held) == 3 * len(ALL) and len(held) > 0
  assert f'trained on {len(train)} sentences' in out
  assert f'byte-fallback pieces on {len(held)} held-out sentences' in out
  texts = [c for _, c in ALL] + ['Ein Fahrrad vor dem Bahnhof in Zürich', 'ปราสาทหินพนมรุ้ง']
  ids = tok.encode(texts, 200)
  assert sp.unk_id() not in ids.ravel().tolist()
  assert [tok.decode(row) for row in ids] == texts


def test_unseen_script_falls_back_to_bytes(corpus, tmp_path):
  path = tokenizer_lib.main(['--out', str(tmp_path / 'sp'), '--vocab_size', '1000',
                             '--records', str(corpus / '*.array_record')])
  tok = tokenizer_lib.Tokenizer(path)
  # Thai, unseen: all bytes but the word-start piece.
  assert tokenizer_lib.byte_fallback_fraction(tok, ['ปราสาทหินพนมรุ้ง']) > 0.95
  assert tokenizer_lib.byte_fallback_fraction(tok, [c for _, c in ALL]) < 0.05


def test_record_sampling_is_deterministic(corpus):
  files = [str(corpus / 'a.array_record'), str(corpus / 'b.array_record')]
  train, held = tokenizer_lib.sample_records(files, max_sentences=20, held_out=5, seed=0)
  assert (len(train), len(held)) == (20, 5)
  assert (train, held) == tokenizer_lib.sample_records(files, 20, 5, seed=0)
  assert (train, held) != tokenizer_lib.sample_records(files, 20, 5, seed=1)
  every = tokenizer_lib.sample_records(files, max_sentences=10**6, held_out=5, seed=0)
  assert sorted(every[0] + every[1]) == sorted(3 * [c for _, c in ALL])


def test_line_sampling_is_deterministic(tmp_path):
  path = tmp_path / 'captions.txt'
  path.write_text(''.join(f'{c} {i}\n\n' for i in range(100) for _, c in ALL), encoding='utf-8')
  n = 100 * len(ALL)
  train, held = tokenizer_lib.sample_lines(str(path), max_sentences=200, held_out=50, seed=0)
  assert (len(train), len(held)) == (200, 50) and not set(train) & set(held)
  assert (train, held) == tokenizer_lib.sample_lines(str(path), 200, 50, seed=0)
  assert (train, held) != tokenizer_lib.sample_lines(str(path), 200, 50, seed=1)
  # The sample reaches the end of the file, not only its start.
  assert max(int(t.rsplit(' ', 1)[1]) for t in train) > 90
  every = tokenizer_lib.sample_lines(str(path), max_sentences=n, held_out=50, seed=0)
  assert (len(every[0]), len(every[1])) == (n - 50, 50)


def test_the_same_sample_trains_the_same_model(corpus, tmp_path):
  def train(name):
    path = tokenizer_lib.main(['--out', str(tmp_path / name), '--vocab_size', '1000',
                               '--records', str(corpus), '--max_sentences', '40'])
    return tokenizer_lib.Tokenizer(path).pieces()
  assert train('one') == train('two')


def test_no_caption_to_train_on(tmp_path):
  arrayrecord.write(str(tmp_path / 'e.array_record'), [records.make('k', b'i', '  ')])
  with pytest.raises(SystemExit, match='no caption'):
    tokenizer_lib.main(['--out', str(tmp_path / 'sp'), '--records', str(tmp_path)])
