"""Evaluation data: Karpathy JSON, a TFDS ClassLabel dataset, the built-in labels; config.evals checks."""
import io
import subprocess
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_config
from PIL import Image

import data_fixtures as fx
from vlp import plan as plan_lib
from vlp.core import config as config_lib
from vlp.data import karpathy, synthetic, tokenizer as tok
from vlp.eval import datasets


def _karpathy(tmp_path):
  """dataset_coco.json-shaped: COCO's filepath folders, restval, uneven captions, a missing file."""
  entries = []
  for i, (split, n_sent) in enumerate([('train', 5), ('test', 5), ('restval', 5), ('test', 3),
                                       ('val', 5), ('test', 6), ('test', 5)]):
    folder = 'val2014' if i % 2 else 'train2014'
    name = f'COCO_{folder}_{i:012d}.jpg'
    if i != 6:  # the last test image is missing on disk
      (tmp_path / 'images' / folder).mkdir(parents=True, exist_ok=True)
      (tmp_path / 'images' / folder / name).write_bytes(fx.jpeg(i, size=(48, 40)))
    entries.append({'filepath': folder, 'filename': name, 'imgid': i, 'split': split, 'cocoid': 1000 + i,
                    'sentids': list(range(10 * i, 10 * i + n_sent)),
                    'sentences': [{'raw': f'Image {i}, caption {j}.', 'tokens': ['image'], 'imgid': i,
                                   'sentid': 10 * i + j} for j in range(n_sent)]})
  path = tmp_path / 'dataset_coco.json'
  path.write_text(json.dumps({'images': entries, 'dataset': 'coco'}))
  return str(path), str(tmp_path / 'images')


def test_karpathy_json_reads_the_test_split_with_every_caption(tmp_path):
  path, image_dir = _karpathy(tmp_path)
  source = karpathy.KarpathySource(path, image_dir, 'test')
  assert len(source) == 4 and source.file(0).endswith('val2014/COCO_val2014_000000000001.jpg')
  assert source.captions(1) == [('', f'Image 3, caption {j}.') for j in range(3)]
  c = tiny_config()
  e = config_lib.eval_config('retrieval', data='karpathy', path=path, image_dir=image_dir)
  data = datasets.retrieval_data(config_lib.ml_collections.ConfigDict(e), c, tok.builtin_tokenizer())
  assert data['skipped'] == {'missing_image': 1}
  assert data['image'].shape == (3, 16, 16, 3)  # resized and centre-cropped to the model's size
  assert data['text_to_image'].tolist() == [0] * 5 + [1] * 3 + [2] * 6
  assert list(data['language']) == [''] * 14
  want = tok.builtin_tokenizer().encode([f'Image {i}, caption {j}.' for i, n in ((1, 5), (3, 3), (5, 6))
                                         for j in range(n)], 16)
  np.testing.assert_array_equal(data['text'], want)
  with pytest.raises(ValueError, match="no image of split 'testing'; splits there: .*'restval'"):
    karpathy.KarpathySource(path, image_dir, 'testing')


def test_builtin_labels_are_the_first_named_object():
  c = tiny_config(**{'data.eval_images': 12})
  e = config_lib.ml_collections.ConfigDict(config_lib.eval_config('zeroshot', data='synthetic'))
  data = datasets.classification_data(e, c)
  scenes = synthetic.SyntheticScenes('test', 12, image_size=16, seed=c.seed)
  assert data['class_names'] == synthetic.CLASS_NAMES and data['image'].shape == (12, 16, 16, 3)
  for i in range(12):
    words = dict(scenes.captions(i))['en'].split()
    colour, shape = data['class_names'][data['label'][i]].split()
    # the first colour and the first shape the caption names are the class
    assert [w for w in words if w in synthetic.COLOURS][0] == colour
    assert [w for w in words if w in synthetic.SHAPES][0] == shape


class VlpTinyLabels(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """imagenet2012-shaped: an encoded image and a ClassLabel."""
  VERSION = tfds.core.Version('1.0.0')
  NAMES = ['tench', 'goldfish', 'great_white_shark']

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='png'),
        'label': tfds.features.ClassLabel(names=self.NAMES),
        'file_name': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'validation': self._generate_examples()}

  def _generate_examples(self):
    for i in range(9):
      buffer = io.BytesIO()
      Image.fromarray(np.full((20, 24, 3), 25 * i, np.uint8)).save(buffer, format='PNG')
      yield i, {'image': buffer.getvalue(), 'label': i % 3, 'file_name': f'{i}.png'}


def _prepared_zeroshot(builder, name, tmp_path):
  """(evaluator entry, its data) of a TFDS builder prepared in tmp_path."""
  tfds.disable_progress_bar()
  builder(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  e = config_lib.ml_collections.ConfigDict(config_lib.eval_config(
      'zeroshot', data='tfds', tfds_name=name, tfds_data_dir=str(tmp_path), split='validation'))
  return e, datasets.classification_data(e, tiny_config())


def test_tfds_class_label_dataset(tmp_path):
  _, data = _prepared_zeroshot(VlpTinyLabels, 'vlp_tiny_labels', tmp_path)
  assert data['class_names'] == ['tench', 'goldfish', 'great_white_shark']
  assert data['image'].shape == (9, 16, 16, 3)
  # TFDS shuffles on write: the label must follow the image (grey level 25*i, label i % 3)
  grey = np.round(data['image'][:, 0, 0, 0] / 25).astype(int)
  assert data['label'].tolist() == (grey % 3).tolist()


def test_eval_entries_are_checked_before_compiling():
  c = tiny_config()
  c.evals.zs = config_lib.eval_config('zeroshot', data='folder', path='/x')
  plan_lib.validate(c, 8)
  c.evals.zs.templats = ('a {}',)
  with pytest.raises(config_lib.ConfigError, match=r"'evals.zs.templats': unknown key; did you mean 'evals.zs.templates'"):
    plan_lib.validate(c, 8)
  del c.evals.zs['templats']
  c.evals.zs.templates = ('a photo',)
  with pytest.raises(config_lib.ConfigError, match="'evals.zs.templates'"):
    plan_lib.validate(c, 8)
  c.evals.zs = config_lib.eval_config('zeroshot', data='karpathy')
  with pytest.raises(config_lib.ConfigError, match="'evals.zs.data': 'karpathy' not in synthetic/synthetic_video/folder/tfds"):
    plan_lib.validate(c, 8)
  with pytest.raises(config_lib.ConfigError, match="no key"):
    config_lib.eval_config('retrieval', templates=('a {}',))


def test_tfds_captions_for_retrieval(tmp_path):
  """coco_captions-shaped TFDS data: every caption of an image, images without captions skipped."""
  from test_tfds_source import VlpTinyCaptions, examples, png

  class VlpTinyCocoEval(VlpTinyCaptions, skip_registration=True):
    def _generate_examples(self, split):  # the same, with images big enough to resize
      for i, ex in enumerate(examples(split)):
        yield i, {'image': png(np.kron(ex['pixels'], np.ones((8, 8, 1), np.uint8))), 'image/id': ex['image/id'],
                  'captions': [{'id': 10 * i + j, 'text': t} for j, t in enumerate(ex['texts'])], 'title': ''}

  tfds.disable_progress_bar()
  VlpTinyCocoEval(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  e = config_lib.ml_collections.ConfigDict(config_lib.eval_config(
      'retrieval', data='tfds', tfds_name='vlp_tiny_coco_eval', tfds_data_dir=str(tmp_path), split='train'))
  data = datasets.retrieval_data(e, tiny_config(), tok.builtin_tokenizer())
  counts = sorted(len(ex['texts']) for ex in examples('train') if ex['texts'])
  assert sorted(np.bincount(data['text_to_image']).tolist()) == counts
  assert len(data['image']) == len(counts) and data['skipped'] == {'empty_caption': 1}


IMAGENET_WNIDS = ['n01440764', 'n01443537', 'n01484850']  # the first three classes of ImageNet-1k


class VlpTinyImagenet(VlpTinyLabels, skip_registration=True):
  """imagenet2012-shaped down to its class names: WordNet ids."""
  NAMES = IMAGENET_WNIDS


def test_wordnet_ids_read_as_clips_names_with_its_80_templates(tmp_path):
  """TFDS imagenet2012 and ImageNet folders name classes by WordNet id: the prompts get CLIP's
  class names and its 80 ImageNet templates, not 'a photo of a n01440764.'."""
  import data_fixtures as fx
  from vlp import eval as eval_lib
  e, data = _prepared_zeroshot(VlpTinyImagenet, 'vlp_tiny_imagenet', tmp_path)
  assert data['class_names'] == ['tench', 'goldfish', 'great white shark']
  assert len(data['templates']) == 80 and data['templates'][0] == 'a bad photo of a {}.'
  # a folder layout holding a few classes of ImageNet, not the first ones
  root = tmp_path / 'val'
  for wnid in ('n02085620', 'n04592741', 'n01440764'):
    (root / wnid).mkdir(parents=True)
    (root / wnid / 'a.JPEG').write_bytes(fx.jpeg(1))
  c = tiny_config()
  c.evals = {'imagenet': config_lib.eval_config('zeroshot', data='folder', path=str(root))}
  fns = {'image': lambda p, x: x.reshape(x.shape[0], -1)[:, :4], 'text': lambda p, t: t[:, :4].astype(float)}
  tokenizer = tok.for_config(c)
  [(_, _, ev)] = eval_lib.make(c, fns, tokenizer)
  assert ev.data['class_names'] == ['tench', 'Chihuahua', 'airplane wing']  # CLIP's names, folders sorted
  want = tokenizer.encode([t.format(n) for n in ('tench', 'Chihuahua', 'airplane wing') for t in data['templates']],
                          c.model.text.context_length)
  np.testing.assert_array_equal(ev.prompts, want)
  # names given in the config win; WordNet ids outside ImageNet-1k are an error, not a prompt
  e.class_names = ('fish a', 'fish b', 'shark')
  assert datasets.classification_data(e, tiny_config())['class_names'] == list(e.class_names)
  (root / 'n99999999').mkdir()
  (root / 'n99999999' / 'a.JPEG').write_bytes(fx.jpeg(2))
  with pytest.raises(ValueError, match="n99999999.*class_names="):
    eval_lib.make(c, fns, tokenizer)


def test_the_shipped_imagenet_table_is_tfds_label_order_and_clips_lists():
  """vlp's table against independent copies: TFDS's own imagenet2012 label file (the WordNet ids
  in label order) and open_clip's zero_shot_metadata (CLIP's names and templates) where the
  open_clip environment is installed."""
  import importlib.util
  import pathlib
  from vlp.eval import imagenet
  table = imagenet._table()
  tfds_labels = pathlib.Path(tfds.__file__).parent / 'datasets' / 'imagenet2012' / 'labels.txt'
  assert table['wnids'] == tfds_labels.read_text().split()
  assert len(imagenet.class_names()) == 1000 and len(imagenet.templates()) == 80
  assert all(t.count('{}') == 1 for t in imagenet.templates())
  from vlp.bench import compare
  try:
    python = compare.bench_python(None)
  except compare.ReferenceEnvError:
    pytest.skip('no open_clip environment (launch/setup_bench_env.sh) to compare against')
  found = subprocess.run([python, '-c', 'import importlib.util as u; print(u.find_spec("open_clip").origin)'],
                         capture_output=True, text=True, check=True).stdout.strip()
  spec = importlib.util.spec_from_file_location('zsm', pathlib.Path(found).parent / 'zero_shot_metadata.py')
  zsm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(zsm)
  assert imagenet.class_names() == tuple(zsm.IMAGENET_CLASSNAMES)
  assert imagenet.templates() == tuple(t('{}') for t in zsm.OPENAI_IMAGENET_TEMPLATES)
