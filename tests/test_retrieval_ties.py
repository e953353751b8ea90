"""Recall's rules with tied scores and duplicate captions (issue 34), against the definition
written out in numpy: a tie counts against the query (a target's rank is 1 + the candidates
scoring strictly higher + the other non-target candidates scoring equal), and a caption text an
image has twice counts once. The chunked pass, the evaluators and `vlp bench quality`'s
open_clip side all follow it."""
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from vlp.eval import retrieval


def _naive(img, txt, t2i, ks):
  """The definition, query by query; every score its own float64 dot product, so equal
  embeddings tie exactly. (recalls in percent, {'i2t', 't2i': ranks from 1; 'i2t_tied',
  't2i_tied': whether the target ties a non-target}), images without captions left out."""
  scores = np.array([[np.dot(a, b) for b in txt.astype(np.float64)] for a in img.astype(np.float64)])
  out = {'i2t': [], 'i2t_tied': [], 't2i': [], 't2i_tied': []}
  for i in range(len(img)):
    targets = [j for j in range(len(txt)) if t2i[j] == i]
    if not targets:
      continue
    best = max(scores[i, j] for j in targets)
    higher = sum(scores[i, j] > best for j in range(len(txt)))
    equal = sum(scores[i, j] == best for j in range(len(txt)) if j not in targets)
    out['i2t'].append(1 + higher + equal)
    out['i2t_tied'].append(equal > 0)
  for j in range(len(txt)):
    mine = scores[t2i[j], j]
    higher = sum(scores[i, j] > mine for i in range(len(img)))
    equal = sum(scores[i, j] == mine for i in range(len(img)) if i != t2i[j])
    out['t2i'].append(1 + higher + equal)
    out['t2i_tied'].append(equal > 0)
  out = {k: np.array(v) for k, v in out.items()}
  recall = {f'{d}@{k}': 100.0 * np.mean(out[d] <= k) for k in ks for d in ('i2t', 't2i')}
  return recall, out


def _tied_set(rng, integer: bool):
  """Images with a duplicate (image 7 = image 3: every caption ties them), captions of one text
  attached to several images (the built-in set's shared captions), uneven captions per image
  and an image without any. Integer embeddings score exactly in any order; unit float ones
  tie only where the embeddings are equal."""
  n_img, d = 12, 8 if integer else 64
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  draw = ((lambda *s: rng.integers(-2, 3, s).astype(np.float32)) if integer
          else (lambda *s: unit(rng.normal(size=s)).astype(np.float32)))
  img = draw(n_img, d)
  img[7] = img[3]
  t2i = np.concatenate([np.full(n, i) for i, n in enumerate([2, 4, 1, 3, 0, 2, 1, 3, 2, 1, 4, 2])])
  txt = draw(len(t2i), d) + img[t2i]  # captions near their image
  txt = txt if integer else unit(txt).astype(np.float32)
  # one text shared by two images; the only captions of images 2 and 6 among them (image->text ties)
  for a, b in ((0, 5), (6, 3), (12, 16), (14, 20)):
    assert t2i[a] != t2i[b]
    txt[b] = txt[a]
  return img, txt, t2i


@pytest.mark.parametrize('integer', [True, False])
def test_constructed_ties_count_against_as_the_definition_says(integer):
  img, txt, t2i = _tied_set(np.random.default_rng(0), integer)
  ks = (1, 2, 5)
  want, naive = _naive(img, txt, t2i, ks)
  assert naive['i2t_tied'].sum() >= 2 and naive['t2i_tied'].sum() >= 5  # the set has ties both ways
  for chunk in (1, 3, 7, 1000):  # tiles that divide neither count, one tile for all
    assert retrieval.recall_at_k(img, txt, t2i, ks, chunk=chunk) == pytest.approx(want), chunk
    found = retrieval.query_ranks(img, txt, t2i, chunk=chunk)
    for key in ('i2t', 't2i'):
      np.testing.assert_array_equal(found[key] + 1, naive[key], err_msg=f'{key}, chunk {chunk}')
      np.testing.assert_array_equal(found[f'{key}_tied'], naive[f'{key}_tied'], err_msg=f'{key}, chunk {chunk}')
  got = retrieval.evaluate(img, txt, t2i, ks=ks)
  assert (got['ties_i2t'], got['ties_t2i']) == (naive['i2t_tied'].sum(), naive['t2i_tied'].sum())


def test_the_chunked_pass_equals_the_dense_definition_on_random_embeddings():
  """Many chunkings of a larger random set (few ties) against the definition."""
  rng = np.random.default_rng(1)
  img = rng.normal(size=(60, 16)).astype(np.float32)
  t2i = rng.integers(0, 60, size=170)
  txt = (img[t2i] + 1.3 * rng.normal(size=(170, 16))).astype(np.float32)
  ks = (1, 5, 10)
  want, naive = _naive(img, txt, t2i, ks)
  assert 5 < want['t2i@1'] < 95  # neither trivial nor hopeless
  for chunk in (1, 16, 59, 64, 256):
    assert retrieval.recall_at_k(img, txt, t2i, ks, chunk=chunk) == pytest.approx(want), chunk
    found = retrieval.query_ranks(img, txt, t2i, chunk=chunk)
    np.testing.assert_array_equal(found['t2i'] + 1, naive['t2i'], err_msg=str(chunk))
    np.testing.assert_array_equal(found['i2t'] + 1, naive['i2t'], err_msg=str(chunk))


def _tokens_of(txt_ids, length=6):
  """Token rows of caption texts numbered by txt_ids (equal ids: the same text)."""
  return np.stack([np.r_[2, 10 + t, 11 + t % 5, 3, np.zeros(length - 4)] for t in txt_ids]).astype(np.int32)


def _fake_encoders(img, text_table):
  """predict_fns of a model whose image i embeds as img[i] (its pixels hold i) and whose
  caption text t embeds as text_table[t] (its second token is 10 + t)."""
  image = lambda params, x: jnp.asarray(img)[x[:, 0, 0, 0].astype(jnp.int32)]
  text = lambda params, tokens: jnp.asarray(text_table)[tokens[:, 1] - 10]
  return {'image': image, 'text': text}


def test_the_evaluator_keeps_a_caption_an_image_has_twice_once_and_reports_ties():
  rng = np.random.default_rng(2)
  img, text_table, _ = _tied_set(rng, integer=True)
  # caption texts of each image: text 0 twice for image 0 (a duplicate), text 1 for images 0 and 2
  # (shared: a tie), text 4 twice for image 3 and once for image 5
  pairs = [(0, 0), (1, 0), (0, 0), (2, 1), (3, 1), (1, 2), (4, 3), (4, 3), (4, 5), (5, 6), (6, 7), (7, 8),
           (8, 9), (9, 10), (10, 11), (11, 11), (11, 11)]
  txt_ids, t2i = np.array([t for t, _ in pairs]), np.array([i for _, i in pairs], np.int32)
  images = np.broadcast_to(np.arange(len(img), dtype=np.uint8)[:, None, None, None], (len(img), 2, 2, 3)).copy()
  data = {'image': images, 'text': _tokens_of(txt_ids), 'text_to_image': t2i, 'language': np.array(['en'] * 17)}
  ev = retrieval.Evaluator(_fake_encoders(img, text_table), data, batch_size=4, ks=(1, 5, 10))
  got = dict(ev.run({}))
  keep = [0, 1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]  # the second (0, 0), (4, 3) and (11, 11) go
  want, naive = _naive(img, text_table[txt_ids[keep]], t2i[keep], (1, 5, 10))
  ties_i2t, ties_t2i = naive['i2t_tied'].sum(), naive['t2i_tied'].sum()
  assert got['duplicate_captions'] == 3
  assert {k: got[k] for k in want} == pytest.approx(want)
  assert (got['ties_i2t'], got['ties_t2i']) == (ties_i2t, ties_t2i) and ties_t2i > 0
  table = retrieval.format_table(got)
  assert f'ties counted against: {ties_i2t} image queries, {ties_t2i} caption queries' in table
  assert 'duplicate captions of an image counted once: 3' in table


def test_distinct_captions_embeds_each_text_once():
  tokens = _tokens_of([5, 6, 5, 5, 7])
  found = retrieval.distinct_captions(tokens, np.array([0, 0, 0, 1, 1]))
  np.testing.assert_array_equal(found['keep'], [0, 1, 3, 4])  # caption 2 repeats caption 0 on image 0
  assert len(found['texts']) == 3  # 5, 6 and 7, once each
  np.testing.assert_array_equal(found['texts'][found['text_of']], tokens[found['keep']])


FAKE_OPEN_CLIP = '''
import json, sys
import numpy as np
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
data = np.load(args['--data'])
fixed = np.load(args['--data'].replace('data.npz', 'embeddings.npz'))
img, table = fixed['img'], fixed['table']
np.savez(args['--out'], image_emb=img[data['eval_image'][:, 0, 0, 0]], text_emb=table[data['eval_text'][:, 1] - 10])
print(json.dumps({'final_logit_scale': 1.0, 'eval_texts': len(data['eval_text'])}))
'''


def test_bench_quality_scores_open_clip_by_the_same_rules(tmp_path, monkeypatch):
  """vlp bench quality's open_clip side (its embedding faked here) against vlp's evaluator on the
  same held-out set: the same recalls, duplicates kept once, ties counted against."""
  from conftest import tiny_config
  from vlp.bench import quality
  img, text_table, _ = _tied_set(np.random.default_rng(3), integer=True)
  pairs = [(0, 0), (0, 0), (1, 0), (1, 2), (2, 1), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (9, 9),
           (10, 10), (11, 11), (12, 11)]
  txt_ids, t2i = np.array([t for t, _ in pairs]), np.array([i for _, i in pairs], np.int32)
  images = np.broadcast_to(np.arange(len(img), dtype=np.uint8)[:, None, None, None], (len(img), 2, 2, 3)).copy()
  data = {'eval_image': images, 'eval_text': _tokens_of(txt_ids), 'text_to_image': t2i}
  np.savez(tmp_path / 'embeddings.npz', img=img, table=text_table)
  (tmp_path / 'fake.py').write_text(FAKE_OPEN_CLIP)
  monkeypatch.setattr(quality, 'REF_SCRIPT', str(tmp_path / 'fake.py'))
  row = quality.run_open_clip(tiny_config(), data, tokenizer=type('T', (), {'sep_id': 3})(), tmp=str(tmp_path),
                              python=sys.executable)
  assert row['eval_texts'] == 13  # 14 kept captions, 13 distinct texts
  ev = retrieval.Evaluator(_fake_encoders(img, text_table),
                           {'image': images, 'text': data['eval_text'], 'text_to_image': t2i}, batch_size=4)
  want = dict(ev.run({}))
  assert want['ties_t2i'] > 0 and want['duplicate_captions'] == 1
  assert {k: row[k] for k in quality.KEYS} == pytest.approx({k: want[k] for k in quality.KEYS})


def test_clip_benchmark_records_keep_the_counts_as_counts():
  """`vlp eval`'s records give recalls as fractions; ties and duplicates stay counts."""
  from conftest import tiny_config
  from vlp import eval as eval_lib
  config = tiny_config()
  metrics = {'retrieval/i2t@1': 50.0, 'retrieval/rsum': 300.0, 'retrieval/ties_i2t': 3,
             'retrieval/ties_t2i': 7, 'retrieval/duplicate_captions': 2}
  (record,) = eval_lib.records([('retrieval', config.evals.retrieval, None)], metrics, config, 'm')
  assert record['metrics'] == {'text_retrieval_recall@1': 0.5, 'rsum': 300.0, 'ties_i2t': 3, 'ties_t2i': 7,
                               'duplicate_captions': 2}
