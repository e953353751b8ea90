"""Orbax: keep-N plus keep-every-K, a chosen resume step, step metadata, and
restoring onto another mesh or fewer devices."""
import importlib.metadata

import jax
import numpy as np
import pytest
from conftest import init_of, setup_of, tiny_config

from vlp.core import parallel
from vlp.train import loop
from vlp.workdir import checkpoints, metrics as metrics_lib


def _losses(workdir):
  return {r['step']: r['loss'] for r in metrics_lib.read_jsonl(str(workdir)) if 'loss' in r}


@pytest.mark.slow
def test_keep_every_metadata_and_resuming_a_chosen_step(tmp_path):
  ck = {'checkpoint.every': 1, 'checkpoint.keep': 2, 'checkpoint.keep_every': 3}
  loop.train(tiny_config(total_steps=8, **ck), str(tmp_path), progress=False)
  manager = checkpoints.manager(str(tmp_path), tiny_config(**ck).checkpoint, read_only=True)
  assert manager.all_steps() == [3, 6, 7, 8]  # multiples of 3 kept, and the last 2
  meta = manager.step_metadata(8)
  assert meta['versions']['jax'] == jax.__version__
  assert meta['versions']['orbax-checkpoint'] == importlib.metadata.version('orbax-checkpoint')
  assert set(meta['versions']) == {'jax', 'jaxlib', 'flax', 'orbax-checkpoint', 'grain', 'vlp'}
  assert meta['config']['model']['embed_dim'] == 32 and meta['config']['total_steps'] == 8
  straight = _losses(tmp_path)
  # resume step 3 (state and input position): the later checkpoints go, the trajectory is the same
  loop.train(tiny_config(total_steps=8, **ck), str(tmp_path), progress=False, step=3)
  assert _losses(tmp_path) == straight
  with pytest.raises(FileNotFoundError, match=r"--step: no checkpoint of step 5 .*saved: \[3, 6, 7, 8\]"):
    checkpoints.manager(str(tmp_path), tiny_config(**ck).checkpoint).resume_step(5)


def test_restore_onto_another_mesh_and_fewer_devices(tmp_path):
  config = tiny_config()
  eight = setup_of(config, parallel.make_mesh({'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}))
  state = init_of(config, eight)
  saver = checkpoints.manager(str(tmp_path), config.checkpoint)
  saver.save(3, state, force=True)
  saver.wait()
  expected = jax.device_get(state)
  for sizes, devices in (({'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1}, jax.devices()),
                         ({'data': 1, 'fsdp': 2, 'tensor': 1, 'expert': 1}, jax.devices()[:2])):
    setup = setup_of(config, parallel.make_mesh(sizes, devices=devices))
    restored = saver.restore(3, setup.abstract)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    kernel = restored['params']['text']['encoder']['blocks'][0]['mlp']['fc1']['kernel']
    assert kernel.sharding == setup.shardings['params']['text']['encoder']['blocks'][0]['mlp']['fc1']['kernel']
    assert len(kernel.sharding.device_set) == len(devices)
    assert kernel.addressable_shards[0].data.shape == (32 // sizes['fsdp'], 64)
  saver.close()
