"""`vlp bench step`: examples/s, step time, MFU and compile time of the train step.

The batch is random and already on device, so this measures the step alone
(the input pipeline has its own benchmark). MFU = analytic model FLOPs per
second over the fp32 matmul peak measured on the same machine by JAX.
"""
import time

import jax
import numpy as np

from vlp import config as config_lib, models, parallel
from vlp.bench import flops, peak
from vlp.data import transforms
from vlp.train import state as state_lib, step as step_lib


def random_batch(config, mesh, seed=0):
  rng = np.random.default_rng(seed)
  im, tx = config.model.image, config.model.text
  b = config.batch_size
  batch = {
      'image': rng.normal(size=(b, im.image_size, im.image_size, 3)).astype(np.float32),
      'text': rng.integers(5, tx.vocab_size, size=(b, tx.context_length)).astype(np.int32),
  }
  if 'mlm_text' in models.module(config.model).BATCH_KEYS:
    batch['mlm_text'], batch['mlm_labels'] = transforms.mlm_mask(
        batch['text'], rng, vocab_size=tx.vocab_size, prob=config.albef.mlm_prob)
  return jax.device_put(batch, parallel.batch_sharding(mesh))


def run(config, steps: int = 20, warmup: int = 3, peak_flops: float | None = None) -> dict:
  sizes = config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = parallel.make_mesh(sizes)
  setup = state_lib.make_setup(config, mesh)
  state = state_lib.init_state(config, setup)
  train_step, compile_s = step_lib.compile_train_step(config, setup)
  batch = random_batch(config, mesh)
  for _ in range(warmup):
    state, m = train_step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):  # timed one by one: the median is robust to a noisy neighbour
    t = time.perf_counter()
    state, m = train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  model_flops = flops.train_flops(config)
  # Simulated CPU devices share the host's cores: the host peak is the peak.
  per_host = jax.default_backend() == 'cpu'
  peak_flops = peak_flops or peak.measure_matmul_peak() * (1 if per_host else jax.device_count())
  return {
      'examples_per_sec': config.batch_size / step_s,
      'step_ms': 1e3 * step_s,
      'mfu': flops.mfu(model_flops, step_s, peak_flops),
      'compile_s': compile_s,
      'model_tflops_per_step': model_flops / 1e12,
      'peak_tflops': peak_flops / 1e12,
      'devices': jax.device_count(),
      'batch_size': config.batch_size,
  }
