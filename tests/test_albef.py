"""ALBEF: losses against naive numpy of the paper's formulas, momentum, queues,
hard negatives, MLM masking, config checks, ITM re-ranking, resume, base compile."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import plan_of, setup_of, tiny_config, train_losses

from vlp import plan as plan_lib
from vlp.core import config as config_lib, parallel, config_files
from vlp.data import pipeline, synthetic, tokenizer as tok
from vlp.recipes import albef
from vlp.recipes.albef import losses as losses_albef
from vlp.recipes.albef import masking
from vlp.recipes.albef.masking import IGNORE_INDEX
from vlp.workdir import identity, metrics as metrics_lib

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _log_softmax(row):
  m = max(row)
  return [v - m - np.log(sum(np.exp(u - m) for u in row)) for v in row]


def _naive_itc(img, txt, img_m, txt_m, q_img, q_txt, temp, alpha):
  """ALBEF's loss_ita written out element by element."""
  b = len(img)
  txt_all = list(txt_m) + list(q_txt)
  img_all = list(img_m) + list(q_img)
  total = 0.0
  for a, a_m, cands in ((img, img_m, txt_all), (txt, txt_m, img_all)):
    for i in range(b):
      sim = [float(np.dot(a[i], c)) / temp for c in cands]
      sim_m = [float(np.dot(a_m[i], c)) / temp for c in cands]
      p_m = np.exp(_log_softmax(sim_m))
      logp = _log_softmax(sim)
      for j in range(len(cands)):
        target = alpha * p_m[j] + (1 - alpha) * (i == j)
        total -= target * logp[j] / b
  return total / 2


@pytest.mark.parametrize('b,q,d,temp,alpha', [(3, 6, 5, 0.07, 0.0), (4, 8, 8, 0.1, 0.4), (2, 2, 3, 0.5, 1.0)])
def test_itc_matches_naive(b, q, d, temp, alpha):
  rng = np.random.default_rng(b * 10 + q)
  feats = [_unit(rng, n, d) for n in (b, b, b, b, q, q)]
  loss, sim_i2t, sim_t2i = losses_albef.itc_loss(*feats, temp, alpha)
  np.testing.assert_allclose(float(loss), _naive_itc(*feats, temp, alpha), rtol=1e-5)
  img, txt, _, txt_m, _, q_txt = feats
  np.testing.assert_allclose(sim_i2t, img @ np.concatenate([txt_m, q_txt]).T / temp, rtol=1e-5, atol=1e-5)
  assert sim_t2i.shape == (b, b + q)


def test_itm_loss_matches_naive():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(9, 2)).astype(np.float32)
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0], np.int32)
  naive = -np.mean([_log_softmax(list(row))[y] for row, y in zip(logits, labels)])
  np.testing.assert_allclose(float(losses_albef.itm_loss(logits, labels)), naive, rtol=1e-6)


def test_hard_negatives_are_never_the_positive_and_follow_the_weights():
  rng = np.random.default_rng(1)
  b = 5
  sim_i2t, sim_t2i = (rng.normal(size=(b, b)).astype(np.float32) * 2 for _ in range(2))
  keys = jax.random.split(jax.random.key(0), 4000)
  neg_image, neg_text = jax.vmap(lambda k: losses_albef.sample_itm_negatives(k, sim_i2t, sim_t2i))(keys)
  neg_image, neg_text = np.asarray(neg_image), np.asarray(neg_text)
  assert not np.any(neg_image == np.arange(b)) and not np.any(neg_text == np.arange(b))
  for sim, drawn in ((sim_t2i, neg_image), (sim_i2t, neg_text)):
    for i in range(b):  # ALBEF: softmax(sim) + 1e-4, positive set to 0, renormalised by multinomial
      w = np.exp(sim[i] - sim[i].max())
      w = w / w.sum() + 1e-4
      w[i] = 0
      freq = np.bincount(drawn[:, i], minlength=b) / len(drawn)
      np.testing.assert_allclose(freq, w / w.sum(), atol=0.03)
  # a fixed key gives the same draw: the step's key makes training reproducible
  again = losses_albef.sample_itm_negatives(keys[0], sim_i2t, sim_t2i)
  assert (np.asarray(again[0]) == neg_image[0]).all() and (np.asarray(again[1]) == neg_text[0]).all()


def test_mlm_loss_matches_naive():
  rng = np.random.default_rng(2)
  b, l, v, alpha = 2, 5, 7, 0.3
  logits, logits_m = (rng.normal(size=(b, l, v)).astype(np.float32) for _ in range(2))
  labels = np.full((b, l), IGNORE_INDEX, np.int32)
  labels[0, 1], labels[0, 3], labels[1, 4] = 2, 6, 0
  hard, soft, n = 0.0, 0.0, 0
  for i in range(b):
    for j in range(l):
      if labels[i, j] == IGNORE_INDEX:
        continue
      logp = _log_softmax(list(logits[i, j]))
      p_m = np.exp(_log_softmax(list(logits_m[i, j])))
      hard -= logp[labels[i, j]]
      soft -= sum(p_m[k] * logp[k] for k in range(v))
      n += 1
  naive = (1 - alpha) * hard / n + alpha * soft / n
  np.testing.assert_allclose(float(losses_albef.mlm_loss(logits, labels, logits_m, alpha)), naive, rtol=1e-5)


def test_ema_update_and_no_gradient_to_the_online_params():
  momentum = {'w': jnp.array([1.0, 2.0]), 'b': jnp.array(3.0)}
  online = {'w': jnp.array([0.0, 4.0]), 'b': jnp.array(-1.0)}
  new = albef.ema(momentum, online, 0.995)
  np.testing.assert_allclose(new['w'], [0.995, 0.995 * 2 + 0.005 * 4], rtol=1e-6)
  np.testing.assert_allclose(new['b'], 0.995 * 3 - 0.005, rtol=1e-6)
  grad = jax.grad(lambda p: jnp.sum(albef.ema(momentum, p, 0.995)['w']))(online)
  assert float(jnp.abs(grad['w']).sum()) == 0.0


def test_queue_wraps_around():
  queue, ptr = jnp.zeros((6, 2)), jnp.int32(0)
  ptrs = []
  for step in range(4):
    queue, ptr = albef.enqueue(queue, ptr, jnp.full((2, 2), step + 1.0))
    ptrs.append(int(ptr))
  assert ptrs == [2, 4, 0, 2]
  np.testing.assert_array_equal(queue[:, 0], [4, 4, 2, 2, 3, 3])  # the 4th batch overwrote the 1st


def test_alpha_ramps_linearly():
  a = tiny_config('albef', **{'albef.alpha': 0.4, 'albef.alpha_warmup_steps': 10}).albef
  got = [float(albef.alpha_at(jnp.int32(s), a)) for s in (0, 5, 10, 50)]
  np.testing.assert_allclose(got, [0.0, 0.2, 0.4, 0.4], rtol=1e-6)


def test_pipeline_masking_never_touches_pad_or_cls():
  tokenizer = tok.builtin_tokenizer()
  transform = masking.MlmMasking(0.5, tokenizer.vocab_size, tokenizer.mask_id, tokenizer.special_ids)
  prep = pipeline.Preprocess(tokenizer, 16, 16, transform=transform)
  source = synthetic.SyntheticScenes(split='train', num_examples=40, image_size=16, seed=0)
  rng = np.random.default_rng(0)
  examples = [prep(source[i], rng) for i in range(40)]
  text = np.stack([e['text'] for e in examples])
  mlm_text, labels = np.stack([e['mlm_text'] for e in examples]), np.stack([e['mlm_labels'] for e in examples])
  special = (text == 0) | (text == 2)  # PAD, CLS
  assert special.sum() > 40 and (mlm_text[special] == text[special]).all()
  assert (labels[special] == IGNORE_INDEX).all()
  selected = labels != IGNORE_INDEX
  assert 0.3 < selected.sum() / (~special & (text != 3)).sum() < 0.7  # about mlm_prob of the others
  assert (labels[selected] == text[selected]).all()


def _albef(**overrides):
  return tiny_config('albef', **{'model.text.depth': 3, 'model.fusion_layer': 2,
                        'albef.queue_size': 32, 'albef.alpha_warmup_steps': 2, **overrides})


@pytest.mark.parametrize('override,key', [
    ({'albef.queue_size': 40}, 'albef.queue_size'),
    ({'model.fusion_layer': 3}, 'model.fusion_layer'),
    ({'accum_steps': 2}, 'accum_steps'),
])
def test_config_checks_name_the_key(override, key):
  with pytest.raises(config_lib.ConfigError, match=f"config key '{key}'"):
    plan_lib.validate(_albef(**override), num_devices=8)


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
def test_moe_towers_train_over_the_expert_axis_like_on_one_device():
  """MoE in the ViT and in both parts of the text stack; the aux losses join the loss."""
  moe = dict(num_experts=4, every=1, router='expert_choice', k=1, capacity_factor=1.0, batch_priority=False)
  config = _albef(**{'model.image.moe': dict(moe, last=1), 'model.text.moe': dict(moe, last=2)})
  plan_lib.validate(config, num_devices=8)
  one = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}, devices=jax.devices()[:1])
  eight = parallel.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 4})
  single, _, _, _ = train_losses(config, one, steps=2)
  sharded, state, metrics, _ = train_losses(config, eight, steps=2)
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  for layer in ('image/encoder/blocks/1', 'text/text_blocks/1', 'text/fusion_blocks/0'):
    assert f'moe/{layer}/mlp/router_z' in metrics, sorted(metrics)
  # expert choice has no balance loss; the router z-loss of every call of every layer (the text
  # stack runs for ITC, ITM and MLM) joins the loss; metrics show one call per layer
  parts = lambda m: float(m['loss']) - sum(float(m[k]) for k in ('loss_itc', 'loss_itm', 'loss_mlm'))
  logged = sum(float(v) for k, v in metrics.items() if k.endswith('router_z'))
  assert 0.001 * logged * 0.99 < parts(metrics) < 0.001 * logged * 2.01
  _, _, without, _ = train_losses(config_files.apply_overrides(config, ['loss.moe_router_z=0.0']), one, steps=2)
  assert parts(without) == pytest.approx(0.0, abs=1e-5)
  w1 = state['params']['text']['fusion_blocks'][0]['mlp']['w1']
  assert w1.sharding.spec[0] == 'expert'
  assert 'w1' in state['model_state']['momentum']['text']['fusion_blocks'][0]['mlp']  # the momentum copy has the experts too


def test_model_parameters_carry_logical_axes_and_momentum_is_sharded_like_params():
  config = _albef()
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  setup = setup_of(config, mesh)
  kernel = ['text', 'fusion_blocks', 0, 'cross', 'kv']
  get = lambda tree: tree[kernel[0]][kernel[1]][kernel[2]][kernel[3]][kernel[4]]
  model_state = setup.shardings['model_state']
  assert get(setup.shardings['params']).spec == get(model_state['momentum']).spec
  assert get(model_state['momentum']).spec[0] == 'fsdp'  # image width ('embed') over FSDP
  assert 'itm_head' not in model_state['momentum'] and 'temp' not in model_state['momentum']
  assert setup.abstract['model_state']['image_queue'].shape == (32, 32)
  assert model_state['image_queue'].is_fully_replicated


@pytest.mark.slow  # five small jit compilations: ~30 s CPU, minutes on a busy machine
def test_itm_rerank_with_every_candidate_is_the_full_itm_ranking():
  from flax import nnx
  from vlp.eval import itm_rerank, retrieval
  config = _albef()
  model = albef.RECIPE.build(config.model)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  data = {'image': rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
          'text': np.concatenate([np.full((8, 1), 2), rng.integers(5, 1024, (8, 6)), np.full((8, 1), 3),
                                  np.zeros((8, 8))], axis=1).astype(np.int32),
          'text_to_image': np.repeat(np.arange(4), 2).astype(np.int32)}
  evaluator = itm_rerank.Evaluator(albef.RECIPE.predict_fns(graphdef), data, rerank_k=8, batch_size=8)
  result = dict(evaluator.run(params))
  # naive: the ITM match logit of every (caption, image) pair, in one batch of all 32 pairs
  image_tokens, hidden = model.image.tokens(data['image']), model.text.encode(data['text'])
  t, i = np.repeat(np.arange(8), 4), np.tile(np.arange(4), 8)
  logits = np.asarray(model.itm_logits(hidden[t], data['text'][t] != 0, image_tokens[i]), np.float64)
  full = logits[:, 1].reshape(8, 4).T
  expected = retrieval.recall_at_k_from_scores(full, full.T, data['text_to_image'])
  for key, value in expected.items():
    assert result[f'itm/{key}'] == pytest.approx(value)
  # BLIP-style: ITC logit + log p(match) of the ITM head
  image_emb, text_emb = evaluator.embed(params)
  logprob = (logits[:, 1] - np.log(np.exp(logits).sum(-1))).reshape(8, 4).T
  combined = logprob + image_emb @ text_emb.T / 0.07
  expected = retrieval.recall_at_k_from_scores(combined, combined.T, data['text_to_image'])
  for key, value in expected.items():
    assert result[f'itm_itc/{key}'] == pytest.approx(value)
  itc = retrieval.recall_at_k(image_emb, text_emb, data['text_to_image'])
  assert retrieval.recall_at_k_from_scores(image_emb @ text_emb.T, text_emb @ image_emb.T,
                                           data['text_to_image']) == itc
  assert {k: result[k] for k in itc} == itc


@pytest.mark.slow
def test_resume_continues_the_exact_trajectory(tmp_path):
  """Momentum params, queues and their pointer are in the checkpoint: a resumed run
  continues exactly (losses that lost them would differ from step 4 on)."""
  from vlp.train import loop
  overrides = {'model.image.depth': 1, 'model.text.depth': 2, 'model.fusion_layer': 1, 'batch_size': 8,
               'albef.queue_size': 16}
  run = lambda wd, steps: loop.train(_albef(total_steps=steps, **overrides), str(wd), progress=False)
  logged = lambda wd: {r['step']: (r['loss'], r['loss_itm'], r['loss_mlm'])
                       for r in metrics_lib.read_jsonl(str(wd)) if 'loss' in r}
  result = run(tmp_path / 'straight', 6)
  assert 'retrieval/itm/t2i@1' in result and 'retrieval/t2i@1' in result
  rows = [r for r in metrics_lib.read_jsonl(str(tmp_path / 'straight')) if 'loss' in r]
  assert all(0 <= r['batch_acc_i2t'] <= 1 and 0 <= r['batch_acc_t2i'] <= 1 and 'temp' in r for r in rows)
  run(tmp_path / 'resumed', 3)
  run(tmp_path / 'resumed', 6)
  straight, resumed = logged(tmp_path / 'straight'), logged(tmp_path / 'resumed')
  assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
  assert [resumed[s] for s in range(1, 7)] == [straight[s] for s in range(1, 7)]  # bit for bit


@pytest.mark.slow  # ~17 s CPU tracing ViT-B + BERT-base; longer on a busy machine
def test_albef_base_lowers_with_abstract_shapes_only():
  """The paper's sizes: the whole train step is traced and lowered for 8 devices
  (FSDP over 8) without allocating a parameter."""
  from vlp.train import step as step_lib
  config = config_files.load(os.path.join(CONFIGS, 'albef_base.py'))
  config.mesh.update(data=1, fsdp=8)
  sizes = plan_lib.validate(config, num_devices=8)
  setup = setup_of(config, parallel.make_mesh(sizes))
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract['params']))
  assert 200e6 < n_params < 230e6  # ViT-B/16 (86M) + BERT-base with 6 cross-attention layers (~124M)
  assert setup.abstract['model_state']['image_queue'].shape == (65536, 256)
  plan = plan_of(config)
  [variant] = plan.variants
  jitted = jax.jit(step_lib.make_train_step(plan, setup, variant),
                   in_shardings=(setup.shardings, parallel.batch_sharding(setup.mesh)),
                   out_shardings=(setup.shardings, parallel.replicated(setup.mesh)), donate_argnums=0)
  with parallel.activation_rules(setup.mesh, setup.rules):
    lowered = jitted.lower(setup.abstract, plan.batch_spec(variant, setup.mesh))
  assert 'mlm_labels' in variant.spec
  assert lowered.as_text()  # StableHLO of the sharded step


def test_workdir_of_an_older_run_still_resumes(tmp_path):
  """A config.json written before a key existed has its default; a changed one is refused."""
  import json
  from vlp import checkpoint
  saved = json.loads(tiny_config('albef').to_json())
  del saved['albef']['queue_size'], saved['model']['fusion_layer']
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  identity.check_workdir(tiny_config('albef'), str(tmp_path))
  with pytest.raises(checkpoint.WorkdirMismatch, match='albef.queue_size'):
    identity.check_workdir(tiny_config('albef', **{'albef.queue_size': 1024}), str(tmp_path))
