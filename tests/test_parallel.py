"""Mesh axes, logical rules, tensor parallelism, memory table, and the scale
features of the step: remat, mixed precision, gradient accumulation, chunked loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_model, init_of, plan_of, random_batch_of, setup_of, tiny_config, train_losses
from flax import nnx
from jax.sharding import PartitionSpec as P

from vlp import plan as plan_lib, recipes
from vlp.core import config as config_lib, parallel
from vlp.train import step as step_lib

ALIGN = recipes.get('align')


def _losses(config, mesh, steps=3):
  out, state, _, train_step = train_losses(config, mesh, steps)
  return out, state, train_step


def _block(params):
  return params['image']['encoder']['blocks'][0]


@pytest.mark.slow  # trains: the quick part keeps to unit-sized checks
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
  # temperature 1.0: the gradients at the scale this float32 tolerance was set for (CLIP's
  # start, 14.3, multiplies them, and a recomputed block sums in another order)
  plain = {'model.logit_scale_init': 1.0}
  batch = jax.device_get(random_batch_of(tiny_config(**plain), mesh))
  loss, grads = _loss_and_grads(tiny_config(**plain), batch)
  config = tiny_config(**{'model.remat': policy}, **plain)
  loss_r, grads_r = _loss_and_grads(config, batch)
  np.testing.assert_allclose(loss_r, loss, atol=1e-6)
  # float32 sums in another order: a few ulps of each gradient (rtol), 1e-6 near zero (atol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_r, grads)
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
  # float32, summed in another order: within 1e-5 of each gradient's largest entry (they reach ~50)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-5, atol=1e-5 * np.abs(b + c).max()),
               grads, parts[0][1], parts[1][1])
  whole, _ = _loss_and_grads(config, batch)
  assert abs(float(whole) - float(loss)) > 1e-3  # a contrastive loss of 16 is not the mean of two of 8
  # and the compiled, sharded step computes the same
  losses, *_ = _losses(config, mesh, steps=1)
  np.testing.assert_allclose(losses[0], loss, atol=1e-5)
  with pytest.raises(config_lib.ConfigError, match="'accum_steps'"):
    plan_lib.validate(tiny_config(accum_steps=3), 8)


@pytest.mark.slow
def test_chunked_and_ring_losses_in_the_step_give_the_same_training():
  mesh = parallel.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1, 'expert': 1})
  sigmoid = {'model.head': 'sigmoid', 'batch_size': 32}  # 4 rows per device
  whole, *_ = _losses(tiny_config(**sigmoid), mesh, steps=2)
  chunked, *_ = _losses(tiny_config(**sigmoid, **{'loss.chunk_size': 2}), mesh, steps=2)
  ring, *_ = _losses(tiny_config(**sigmoid, **{'loss.impl': 'ring'}), mesh, steps=2)
  np.testing.assert_allclose(chunked, whole, atol=1e-5)
  np.testing.assert_allclose(ring, whole, atol=1e-5)


def test_loss_impl_and_chunk_size_are_checked():
  with pytest.raises(config_lib.ConfigError, match="'loss.chunk_size': 4 does not divide the 6 rows per device"):
    plan_lib.validate(tiny_config(batch_size=48, **{'loss.chunk_size': 4}), 8)
  plan_lib.validate(tiny_config(batch_size=48, **{'loss.chunk_size': 3}), 8)
  plan_lib.validate(tiny_config(batch_size=48, **{'loss.chunk_size': 64}), 8)  # larger: all 6 rows at once
  with pytest.raises(config_lib.ConfigError, match="'loss.impl'"):
    plan_lib.validate(tiny_config(**{'loss.impl': 'allgather'}), 8)
  with pytest.raises(config_lib.ConfigError, match="'loss.chunk_size': must be 0 with loss.impl=ring"):
    plan_lib.validate(tiny_config(**{'loss.impl': 'ring', 'loss.chunk_size': 2}), 8)
  with pytest.raises(config_lib.ConfigError, match="'loss.impl'"):
    plan_lib.validate(tiny_config('albef', **{'model.text.depth': 3, 'model.fusion_layer': 2, 'loss.impl': 'ring'}), 8)


_LOSS_IMPLS = [('softmax', 'gather', 0), ('softmax', 'gather', 64), ('softmax', 'ring', 0),
               ('sigmoid', 'gather', 0), ('sigmoid', 'gather', 64), ('sigmoid', 'ring', 0)]


@pytest.mark.parametrize('sizes', [{'data': 8}, {'data': 2, 'fsdp': 2, 'tensor': 2}],
                         ids=lambda s: '-'.join(f'{k}{v}' for k, v in s.items()))
def test_memory_table_loss_term_agrees_with_the_compiled_loss(sizes):
  """The recipe's estimate of the contrastive loss (in the memory table's activations) against
  memory_analysis() of the compiled loss and gradient, batch 2048 x 256 on 8 devices."""
  from jax.sharding import NamedSharding
  from vlp import losses
  from vlp.recipes import align
  mesh = parallel.make_mesh(sizes)
  rows = jax.ShapeDtypeStruct((2048, 256), jnp.float32, sharding=NamedSharding(mesh, P(parallel.BATCH_AXES)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))
  for head, impl, chunk in _LOSS_IMPLS:
    config = tiny_config(batch_size=2048, **{'model.embed_dim': 256, 'model.head': head, 'loss.impl': impl,
                                             'loss.chunk_size': chunk, 'mesh.data': sizes['data'],
                                             'mesh.fsdp': sizes.get('fsdp', 1), 'mesh.tensor': sizes.get('tensor', 1)})
    plan = plan_lib.make(config, 8)
    m = config.model
    towers = align.tower_activation_bytes(config, [(m.image, (m.image.image_size // m.image.patch_size) ** 2 + 1),
                                                   (m.text, m.text.context_length)], 2048, plan.sizes)
    estimate = plan.activation_bytes() - towers
    assert estimate == losses.temp_bytes(head, impl, 2048, 8 // sizes.get('tensor', 1), 256, chunk)
    loss = lambda x, y, s, b: align.contrastive(x, y, s, b, head, 0.1, chunk, impl)
    with parallel.activation_rules(mesh, parallel.RULES):
      compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(rows, rows, scalar, scalar).compile()
    measured = compiled.memory_analysis().temp_size_in_bytes
    assert 0.85 * measured <= estimate <= 1.15 * measured, (head, impl, chunk, estimate, measured)


def _devices(processes):
  """Stand-ins for devices: only their process_index matters to shared_batch_rows."""
  return np.array([type('Device', (), {'process_index': p})() for p in processes], dtype=object)


def test_a_mesh_whose_processes_would_share_batch_rows_is_refused():
  # 2 processes x 4 devices, as jax.make_mesh lays them out (process-major, tensor and expert last)
  axes = config_lib.MESH_AXES
  devices = _devices([0, 0, 0, 0, 1, 1, 1, 1])
  assert parallel.shared_batch_rows(devices.reshape(2, 2, 2, 1), axes) == []  # data 2, fsdp 2, tensor 2
  assert parallel.shared_batch_rows(devices.reshape(1, 1, 8, 1), axes) == [(0, [0, 1])]  # tensor 8
  assert parallel.shared_batch_rows(devices.reshape(2, 1, 1, 4), axes) == []  # expert 4: one process each
  assert parallel.shared_batch_rows(devices.reshape(4, 2, 1, 1).transpose(1, 0, 2, 3), axes) == []
  interleaved = _devices([0, 1] * 4).reshape(4, 1, 2, 1)  # tensor pairs across the processes
  assert parallel.shared_batch_rows(interleaved, axes) == [(b, [0, 1]) for b in range(4)]
  # the plan refuses such a mesh before anything is built, naming the key
  with pytest.raises(config_lib.ConfigError, match=r"'mesh.tensor'.* 8 devices .* the 4 devices of a process"):
    plan_lib.make(tiny_config(**{'mesh.data': 1, 'mesh.tensor': 8}), 8, process_count=2)
  with pytest.raises(config_lib.ConfigError, match=r"'mesh.expert'.* 4 devices .* the 2 devices of a process"):
    plan_lib.make(tiny_config(**{'mesh.data': 2, 'mesh.expert': 4}), 8, process_count=4)
  plan_lib.make(tiny_config(**{'mesh.data': 4, 'mesh.tensor': 2}), 8, process_count=4)
  plan_lib.make(tiny_config(**{'mesh.data': 1, 'mesh.tensor': 8}), 8, process_count=1)


@pytest.mark.slow
def test_two_processes_refuse_a_tensor_axis_across_them_before_compiling(tmp_path):
  from test_multihost import launch
  proc = launch(tmp_path / 'run', 2, 2, {'mesh.data': 1, 'mesh.tensor': 4})  # 2 processes x 2 devices
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2, out[-3000:]
  assert out.count("vlp: error: config key 'mesh.tensor'") == 2 and 'Traceback' not in out, out[-3000:]
  assert 'compiled' not in out and 'per-device memory' not in out
