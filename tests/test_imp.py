"""IMP: embedders against naive numpy, DropToken, the classification loss, MoE over the expert axis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from conftest import build_model, plan_of, tiny_config, train_losses, variants_of
from test_agd import imp_config

from vlp import losses, recipes
from vlp.core import parallel
from vlp.core.pixels import normalize_image
from vlp.models import imp
from vlp.workdir import checkpoints

IMP = recipes.get('imp')


def _model(**overrides):
  c = imp_config(**overrides)
  return c, build_model(c.model, seed=0)


def test_video_tubelets_and_positions_match_a_naive_loop():
  c, model = _model()
  rng = np.random.default_rng(0)
  video = rng.normal(size=(2, 4, 16, 16, 3)).astype(np.float32)  # 2 tubelets of 2 frames, 4x4 patches
  tokens = np.asarray(model.video_embed(jnp.asarray(video)))
  emb = model.video_embed
  w, b = np.asarray(emb.proj.kernel[...]), np.asarray(emb.proj.bias[...])
  pos, time, modality = (np.asarray(x[...]) for x in (emb.pos, emb.time, emb.modality))
  assert tokens.shape == (2, 2 * 16, 32)
  for n in range(2):
    for h in range(4):
      for x in range(4):
        cube = video[:, 2 * n:2 * n + 2, 4 * h:4 * h + 4, 4 * x:4 * x + 4]  # [B, t, p, q, c]
        want = cube.reshape(2, -1) @ w + b + pos[h, x] + time[n] + modality
        np.testing.assert_allclose(tokens[:, n * 16 + h * 4 + x], want, atol=1e-5)


def test_any_resolution_and_clip_length_encode():
  c, model = _model()
  for images in (jnp.zeros((3, 16, 16, 3)), jnp.zeros((3, 32, 24, 3))):
    assert model.encode_image(images).shape == (3, 32)
  for video in (jnp.zeros((2, 4, 16, 16, 3)), jnp.zeros((2, 8, 32, 32, 3))):
    emb = np.asarray(model.encode_video(video))
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match='tubelets of 2x4x4'):
    model.encode_video(jnp.zeros((2, 3, 16, 16, 3)))


def test_drop_token_keeps_a_random_subset_in_order():
  x = jnp.arange(2 * 10 * 3, dtype=jnp.float32).reshape(2, 10, 3)
  kept = np.asarray(imp.drop_tokens(x, 0.75, jax.random.key(0)))
  assert kept.shape == (2, 2, 3)  # round(10 * 0.25) = 2 (round half to even: 2.5 -> 2)
  kept = np.asarray(imp.drop_tokens(x, 0.6, jax.random.key(0)))
  assert kept.shape == (2, 4, 3)
  rows = kept[..., 0] / 3 - 10 * np.arange(2)[:, None]  # the original token index of each kept row
  assert np.all(np.diff(rows, axis=1) > 0)  # distinct and in order
  np.testing.assert_array_equal(kept, np.asarray(x)[np.arange(2)[:, None], rows.astype(int)])
  other = np.asarray(imp.drop_tokens(x, 0.6, jax.random.key(1)))
  assert not np.array_equal(kept, other)
  assert imp.drop_tokens(x, 0.0, jax.random.key(0)) is x


def test_classification_loss_is_cross_entropy_over_prompted_class_embeddings():
  c = imp_config(**{'tasks.image_class.templates': ('a {}', 'a picture of a {}'),
                    'tasks.image_class.label_smoothing': 0.1})
  model = build_model(c.model, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  v = variants_of(c)['image_class']
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(16, 16, 16, 3)).astype(np.float32), 'label': rng.integers(0, 48, 16)}
  loss, (metrics, _) = IMP.loss(graphdef, params, {}, batch, jnp.int32(0), c, v)
  # naive: embed every prompt, average per class over templates, normalise, softmax CE with smoothing
  from vlp.data import synthetic, tokenizer as tokenizer_lib
  tok = tokenizer_lib.for_config(c)
  names = synthetic.CLASS_NAMES
  prompts = [t.format(n) for n in names for t in ('a {}', 'a picture of a {}')]
  text = np.asarray(model.encode_text(tok.encode(prompts, 16))).reshape(48, 2, -1).mean(1)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  image = np.asarray(model.encode_image(batch['image']))
  logits = (1 / 0.07) * image @ text.T
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  target = np.full((16, 48), 0.1 / 48)
  target[np.arange(16), batch['label']] += 0.9
  np.testing.assert_allclose(float(loss), -np.mean(np.sum(target * logp, -1)), rtol=1e-4)
  np.testing.assert_allclose(float(metrics['accuracy']), np.mean(logits.argmax(-1) == batch['label']))


def test_contrastive_task_of_video_drops_tokens_with_a_key_per_step():
  c = imp_config()
  model = build_model(c.model, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  v = variants_of(c)['video_text']
  rng = np.random.default_rng(0)
  batch = {'video': rng.normal(size=(16, 4, 16, 16, 3)).astype(np.float32),
           'text': rng.integers(5, 1024, (16, 16)).astype(np.int32)}
  loss = lambda step: float(IMP.loss(graphdef, params, {}, batch, jnp.int32(step), c, v)[0])  # noqa: E731
  assert loss(3) == loss(3) and loss(3) != loss(4)
  full = imp_config(**{'tasks.video_text.drop_token': 0.0})
  v0 = variants_of(full)['video_text']
  want = float(losses.softmax_contrastive(model.encode_video(batch['video']), model.encode_text(batch['text']),
                                          1 / 0.07))
  loss0, (metrics, _) = IMP.loss(graphdef, params, {}, batch, jnp.int32(0), full, v0)
  np.testing.assert_allclose(float(loss0), want, rtol=1e-5)
  # the in-batch accuracy both ways, as argmax over the batch's similarities
  sim = np.asarray(model.encode_video(batch['video'])) @ np.asarray(model.encode_text(batch['text'])).T
  assert float(metrics['batch_acc_i2t']) == pytest.approx(np.mean(sim.argmax(1) == np.arange(16)))
  assert float(metrics['batch_acc_t2i']) == pytest.approx(np.mean(sim.T.argmax(1) == np.arange(16)))


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
def test_moe_imp_over_the_expert_axis_matches_one_device():
  moe = {'model.encoder.moe.num_experts': 4, 'model.encoder.moe.every': 1, 'model.encoder.moe.last': 1}
  c = imp_config(**moe, **{'tasks.image_text.resolutions': (16,)})
  c.tasks = {'image_text': c.tasks.image_text}
  one = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}, devices=jax.devices()[:1])
  eight = parallel.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 4})
  out = {}
  for name, mesh in (('one', one), ('eight', eight)):
    [variant] = variants_of(c).values()
    out[name], state, metrics, _ = train_losses(c, mesh, steps=3, variant=variant)
  np.testing.assert_allclose(out['eight'], out['one'], rtol=1e-5)
  w1 = state['params']['encoder']['blocks'][1]['mlp']['w1']
  assert w1.sharding.spec[0] == 'expert' and w1.addressable_shards[0].data.shape[0] == 1
  assert 'moe/encoder/blocks/1/mlp/drop_rate' in metrics


@pytest.mark.slow  # trains 2 steps, then exports for three platforms
def test_export_has_image_video_and_text_encoders(tmp_path):
  import vlp
  from vlp import cli
  from vlp.train import loop
  c = imp_config(total_steps=2)
  c.tasks = {'video_text': c.tasks.video_text}
  loop.train(c, str(tmp_path / 'wd'), progress=False)
  assert cli.main(['export', f'--workdir={tmp_path / "wd"}', f'--out={tmp_path / "out"}']) == 0
  enc = vlp.load_pretrained(str(tmp_path / 'out'))
  config, params, _ = checkpoints.restore_params(str(tmp_path / 'wd'))
  graphdef, _ = nnx.split(build_model(config.model), nnx.Param)
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(0)
  clips, images = rng.normal(size=(3, 4, 16, 16, 3)), rng.normal(size=(5, 16, 16, 3))
  tokens = enc.tokenize(['a small red circle moving up', 'a large blue square moving down'])
  np.testing.assert_allclose(enc.encode_video(clips), model.encode_video(jnp.asarray(clips, jnp.float32)), atol=1e-5)
  np.testing.assert_allclose(enc.encode_image(images), model.encode_image(jnp.asarray(images, jnp.float32)), atol=1e-5)
  np.testing.assert_allclose(enc.encode_text(tokens), model.encode_text(tokens), atol=1e-5)


def test_every_task_reads_its_own_data_at_its_resolution():
  from vlp.data import synthetic_video, tokenizer as tokenizer_lib
  from vlp.train import input as input_lib
  c = imp_config()
  tok = tokenizer_lib.for_config(c)
  shapes = {}
  plan = plan_of(c)
  for v in plan.variants:
    it = input_lib.train_iterator(plan, tok, v)
    batch = next(it)
    it.close()
    shapes[v.name] = {k: x.shape for k, x in batch.items() if k != 'skipped'}
    vision = batch[v.vision]
    assert vision.dtype == np.uint8  # normalised on the device, in the step
  assert shapes == {'image_class': {'image': (16, 16, 16, 3), 'label': (16,)},
                    'image_text_16px': {'image': (32, 16, 16, 3), 'text': (32, 16)},
                    'image_text_32px': {'image': (8, 32, 32, 3), 'text': (8, 16)},
                    'video_text': {'video': (16, 4, 16, 16, 3), 'text': (16, 16)}}
  # a caption is its clip's own: decode the first one and find the clip in the source
  v = plan.variant('video_text')
  it = input_lib.train_iterator(plan, tok, v)
  batch = next(it)
  it.close()
  source = synthetic_video.SyntheticVideos('train', 2000, 16, 4, seed=0)
  caption = tok.decode(batch['text'][0])  # cut at the 16 tokens of the test model
  matches = [i for i in range(2000) if source.captions(i)[0][1].startswith(caption)]
  assert any(np.array_equal(source[i]['video'], batch['video'][0])
             for i in matches)


def test_video_evaluators_use_the_video_encoder():
  from vlp import eval as eval_lib, plan as plan_lib
  from vlp.core import config as config_lib
  from vlp.core.config import eval_config
  from vlp.data import tokenizer as tokenizer_lib
  from vlp.eval import retrieval
  c = imp_config()
  c.evals.video_retrieval = eval_config('retrieval', data='synthetic_video', num_images=12)
  c.evals.video_zeroshot = eval_config('zeroshot', data='synthetic_video', num_images=12, templates=('a {}',))
  plan_lib.validate(c, 8)
  model = build_model(c.model)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  evaluators = eval_lib.make(c, IMP.predict_fns(graphdef), tokenizer_lib.for_config(c))
  metrics = eval_lib.run(evaluators, params)
  by_name = {name: ev for name, _, ev in evaluators}
  data = by_name['video_retrieval'].data
  assert data['image'].shape == (12, 4, 16, 16, 3)  # clips, under the evaluators' 'image' key
  clips = normalize_image(data['image'])  # uint8: the evaluators normalise on the device
  want = retrieval.recall_at_k(np.asarray(model.encode_video(clips)), np.asarray(model.encode_text(data['text'])),
                               data['text_to_image'])
  assert {k: metrics[f'video_retrieval/{k}'] for k in want} == pytest.approx(want)
  assert 0 <= metrics['video_zeroshot/acc1'] <= 100 and len(by_name['video_zeroshot'].data['class_names']) == 32
  c = tiny_config()  # a dual encoder has no video encoder
  c.evals.video_retrieval = eval_config('retrieval', data='synthetic_video', num_images=12)
  with pytest.raises(config_lib.ConfigError, match="'synthetic_video' evaluates a video encoder"):
    plan_lib.validate(c, 8)


@pytest.mark.slow  # compiles every task twice (MoE and dense)
def test_bench_step_per_task_and_against_dense(capsys):
  import json
  from test_agd import TINY_IMP
  from vlp import cli
  moe = ['--config.model.encoder.moe.num_experts=4', '--config.model.encoder.moe.every=1',
         '--config.model.encoder.moe.last=1']
  assert cli.main(['bench', 'step', f'--config={TINY_IMP}', '--steps=1', '--warmup=0', '--compare=dense', *moe]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  names = set(variants_of(imp_config()))
  assert set(result['tasks']) == set(result['vs_dense']['tasks']) == names
  assert sum(t['share'] for t in result['tasks'].values()) == pytest.approx(1.0)
  for name, t in result['vs_dense']['tasks'].items():
    assert t['step_time_ratio'] == pytest.approx(t['moe_step_ms'] / t['dense_step_ms'])
    assert t['flops_ratio'] > 1.0 and t['moe_compile_s'] > 0  # the router and dispatch/combine on top
  assert cli.main(['bench', 'step', f'--config={TINY_IMP}', '--compare=dense']) == 2
  assert '--compare=dense needs a model with MoE blocks' in capsys.readouterr().err
