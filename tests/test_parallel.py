"""Mesh axes, logical rules, tensor parallelism, memory table, and the scale
features of the step: remat, mixed precision, gradient accumulation, chunked loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_model, init_of, plan_of, random_batch_of, setup_of, tiny_config, train_losses
from flax import nnx
from jax.sharding import PartitionSpec as P

from vlp import config as config_lib, plan as plan_lib, parallel, recipes
from vlp.train import state as state_lib, step as step_lib

ALIGN = recipes.get('align')


def _losses(config, mesh, steps=3):
  out, state, _, train_step = train_losses(config, mesh, steps)
  return out, state, train_step


def _block(params):
  return params['image']['encoder']['blocks'][0]


def test_tensor_parallel_step_matches_single_device():
  config = tiny_config()
  one = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1}, devices=jax.devices()[:1])
  tp = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1})
  single, *_ = _losses(config, one)
  sharded, state, train_step = _losses(config, tp)
  np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
  block = _block(state['params'])
  # heads split over tensor, model width over fsdp: QKV [32, 3, 2 heads, 16] -> [16, 3, 1, 16] per device
  assert block['attn']['qkv'].sharding.spec == P('fsdp', None, 'tensor', None)
  assert block['attn']['qkv'].addressable_shards[0].data.shape == (16, 3, 1, 16)
  # MLP hidden units split over tensor: fc1 [32, 64] -> [16, 32], fc2 [64, 32] -> [32, 16]
  assert block['mlp']['fc1']['kernel'].addressable_shards[0].data.shape == (16, 32)
  assert block['mlp']['fc2']['kernel'].sharding.spec == P('tensor', 'fsdp')
  # and so are the activations: per device, 4 of 16 examples x 17 image tokens x 32 of
  # 64 MLP hidden units, and attention logits of 1 of the 2 heads
  hlo = train_step.as_text()
  assert 'f32[4,17,32]' in hlo and 'f32[4,17,64]' not in hlo
  assert 'f32[4,1,17,17]' in hlo and 'f32[4,2,17,17]' not in hlo


def _hand_bytes(config, fsdp):
  """Per-device bytes of params from their logical names alone: a weight with an
  'embed' dim (width 32, divisible by any fsdp here) is split fsdp ways, the rest replicated."""
  model = nnx.eval_shape(lambda: build_model(config.model))
  _, abstract = nnx.split(model, nnx.Param)
  names = jax.tree.leaves(nnx.to_pure_dict(nnx.get_partition_spec(abstract)), is_leaf=lambda x: isinstance(x, P))
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(abstract))]
  return sum(4 * (n // fsdp if 'embed' in spec else n) for spec, n in zip(names, sizes))


def test_memory_table_params_and_opt_state_fall_with_fsdp():
  config = tiny_config()
  per_device = {}
  for fsdp in (1, 2, 4, 8):
    sizes = {'data': 8 // fsdp, 'fsdp': fsdp, 'tensor': 1, 'expert': 1}
    setup = setup_of(config, parallel.make_mesh(sizes))
    table = parallel.memory_table(setup.abstract, plan_of(config).activation_bytes())
    assert table['params'] == _hand_bytes(config, fsdp)
    # AdamW: mu and nu like the params, plus two int32 step counters (Adam's and the schedule's)
    assert table['opt_state'] == 2 * table['params'] + 8
    per_device[fsdp] = table['params'] + table['opt_state']
  for n in (2, 4, 8):
    assert 0.9 * n < per_device[1] / per_device[n] <= n  # ~1/N: a few biases stay replicated
  # the table agrees with what the devices really hold
  sizes = {'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1}
  setup = setup_of(config, parallel.make_mesh(sizes))
  state = init_of(config, setup)
  held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state['params']))
  assert held == parallel.memory_table(setup.abstract, plan_of(config).activation_bytes())['params']
  text = parallel.format_memory_table(parallel.memory_table(setup.abstract, plan_of(config).activation_bytes()), sizes)
  assert 'fsdp=4' in text and 'opt_state' in text and 'activations (est.)' in text


def test_mesh_rules_in_config_override_the_table():
  config = tiny_config(mesh_rules=(('embed', None), ('mlp', ('fsdp', 'tensor'))))
  sizes = plan_lib.validate(config, 8)
  assert sizes == {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2, 'expert': 1})
  setup = setup_of(config, mesh)
  fc1 = _block(setup.abstract['params'])['mlp']['fc1']['kernel']
  assert fc1.sharding.spec == P(None, ('fsdp', 'tensor'))  # MLP hidden over 4 devices, width whole
  with pytest.raises(config_lib.ConfigError, match="'mesh_rules.embedd'"):
    plan_lib.validate(tiny_config(mesh_rules=(('embedd', None),)), 8)
  with pytest.raises(config_lib.ConfigError, match="'mesh_rules.mlp'.*'model'"):
    plan_lib.validate(tiny_config(mesh_rules=(('mlp', 'model'),)), 8)


def _loss_and_grads(config, batch, accum_steps=1):
  model = build_model(config.model)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  [variant] = plan_of(config).variants
  loss_fn = lambda p, b: ALIGN.loss(graphdef, p, {}, b, jnp.int32(0), config, variant)
  (loss, _), grads = jax.jit(lambda p, b: step_lib.loss_and_grads(loss_fn, p, b, accum_steps))(params, batch)
  return loss, grads


@pytest.mark.parametrize('policy', ['full', 'dots_saveable'])
def test_remat_keeps_loss_and_gradients(policy):
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  batch = jax.device_get(random_batch_of(tiny_config(), mesh))
  loss, grads = _loss_and_grads(tiny_config(), batch)
  config = tiny_config(**{'model.remat': policy})
  loss_r, grads_r = _loss_and_grads(config, batch)
  np.testing.assert_allclose(loss_r, loss, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)
  # the blocks really are rematerialised: a checkpoint (remat) region in the program
  graphdef, params = nnx.split(build_model(config.model), nnx.Param)
  jaxpr = jax.make_jaxpr(lambda p, x, t: nnx.merge(graphdef, p)(x, t))(params, batch['image'], batch['text'])
  assert str(jaxpr).count('remat2[') == 4  # 2 blocks in each tower


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights():
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  config = tiny_config(**{'model.dtype': 'bfloat16'})
  bf16, state, _ = _losses(config, mesh, steps=2)
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {jnp.dtype('float32')}
  mu = _block(state['opt_state'][1][0].mu)['mlp']['fc1']['kernel']
  assert mu.dtype == jnp.float32
  setup = setup_of(config, mesh)
  plan = plan_of(config)
  hlo = jax.jit(step_lib.make_train_step(plan, setup, plan.variants[0])).lower(
      setup.abstract, plan.batch_spec(plan.variants[0], mesh)).as_text()
  assert 'bf16' in hlo and 'dot_general' in hlo
  f32, *_ = _losses(tiny_config(), mesh, steps=2)
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)  # the same training within bf16 rounding
  config = tiny_config(**{'model.dtype': 'bfloat16', 'model.param_dtype': 'bfloat16'})
  setup = setup_of(config, mesh)
  assert {x.dtype for x in jax.tree.leaves(setup.abstract['params'])} == {jnp.dtype('bfloat16')}


@pytest.mark.slow
def test_grad_accumulation_is_the_mean_of_micro_batch_losses():
  mesh = parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  config = tiny_config(accum_steps=2)
  batch = jax.device_get(random_batch_of(config, mesh))
  # naive: each micro-batch (examples j, j+2, ...) on its own, then the mean
  parts = [_loss_and_grads(config, jax.tree.map(lambda x: x[j::2], batch)) for j in range(2)]
  loss, grads = _loss_and_grads(config, batch, accum_steps=2)
  np.testing.assert_allclose(loss, (parts[0][0] + parts[1][0]) / 2, atol=1e-6)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, atol=1e-6), grads, parts[0][1], parts[1][1])
  whole, _ = _loss_and_grads(config, batch)
  assert abs(float(whole) - float(loss)) > 1e-3  # a contrastive loss of 16 is not the mean of two of 8
  # and the compiled, sharded step computes the same
  losses, *_ = _losses(config, mesh, steps=1)
  np.testing.assert_allclose(losses[0], loss, atol=1e-5)
  with pytest.raises(config_lib.ConfigError, match="'accum_steps'"):
    plan_lib.validate(tiny_config(accum_steps=3), 8)


@pytest.mark.slow
def test_chunked_loss_in_the_step_gives_the_same_training():
  mesh = parallel.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1, 'expert': 1})
  whole, *_ = _losses(tiny_config(**{'model.head': 'sigmoid'}), mesh, steps=2)
  chunked, *_ = _losses(tiny_config(**{'model.head': 'sigmoid', 'loss.chunk_size': 4}), mesh, steps=2)
  np.testing.assert_allclose(chunked, whole, atol=1e-5)
  with pytest.raises(config_lib.ConfigError, match="'loss.chunk_size'"):
    plan_lib.validate(tiny_config(**{'loss.chunk_size': 5}), 8)
