"""Schedules against their closed forms; the weight-decay mask; LAMB runs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp.recipes import base_config
from vlp.train import optim


def _optim_cfg(**kw):
  o = base_config().optim
  o.update(kw)
  return o


@pytest.mark.parametrize('kind', ['cosine', 'linear', 'constant'])
def test_schedule_matches_closed_form(kind):
  o = _optim_cfg(lr=2.0, warmup_steps=10, end_lr_frac=0.1, schedule=kind)
  total = 110
  lr = optim.schedule(o, total)
  for step in [0, 5, 10, 30, 60, 109, 110]:
    if step < 10:
      want = 2.0 * step / 10
    else:
      frac = (step - 10) / 100
      want = {'cosine': 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))),
              'linear': 2.0 * (1 - 0.9 * frac),
              'constant': 2.0}[kind]
    assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-6), step


def test_decay_mask_skips_biases_norms_and_positions():
  params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}, 'ln': {'scale': jnp.ones(3)},
            'pos_embed': jnp.ones((4, 3)), 'log_scale': jnp.ones(()), 'qkv': jnp.ones((3, 3, 1, 3)),
            'qkv_bias': jnp.ones((3, 1, 3))}
  mask = optim.decay_mask()(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'ln': {'scale': False},
                  'pos_embed': False, 'log_scale': False, 'qkv': True, 'qkv_bias': False}
  # open_clip's mask: every matrix decays, position embeddings too
  assert optim.decay_mask(())(params)['pos_embed']


@pytest.mark.parametrize('name', ['adamw', 'lamb'])
def test_weight_decay_only_where_masked(name):
  """With zero gradients, only decayed parameters move (towards zero)."""
  o = _optim_cfg(name=name, lr=0.1, warmup_steps=0, weight_decay=0.5, schedule='constant', clip_norm=1.0)
  tx, _ = optim.make(o, total_steps=10)
  params = {'w': jnp.full((2, 2), 2.0), 'b': jnp.full((2,), 2.0)}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(updates['w']) < 0)
  np.testing.assert_array_equal(updates['b'], 0.0)
