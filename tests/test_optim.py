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


def _naive_adamw_step(p, g, lr, o, decay):
  """One AdamW step from zero moments, as the paper writes it (bias-corrected, decoupled decay)."""
  m, v = (1 - o.b1) * g, (1 - o.b2) * g * g
  m_hat, v_hat = m / (1 - o.b1), v / (1 - o.b2)
  return p - lr * (m_hat / (np.sqrt(v_hat) + o.eps) + (o.weight_decay * p if decay else 0.0))


def test_frozen_params_hold_no_state_and_groups_get_their_learning_rate():
  """optim.frozen: no update, no Adam moments; optim.lr_mult: the group's lr is the schedule times
  its factor (the first matching pattern wins); against a naive AdamW step."""
  o = _optim_cfg(lr=0.1, warmup_steps=0, schedule='constant', clip_norm=0.0, weight_decay=0.1,
                 frozen=('image/.*',), lr_mult=(('text/head/.*', 0.25), ('text/.*', 0.5)))
  rng = np.random.default_rng(0)
  params = {'image': {'w': rng.normal(size=(3, 4)).astype(np.float32)},
            'text': {'w': rng.normal(size=(4, 2)).astype(np.float32),
                     'head': {'w': rng.normal(size=(2, 2)).astype(np.float32)}},
            'log_scale': np.float32(0.3)}
  grads = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32), params)
  tx, _ = optim.make(o, total_steps=10)
  state = tx.init(params)
  moments = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert moments == 2 * (4 * 2 + 2 * 2)  # mu and nu of the text matrices only (log_scale is a scalar)
  updates, _ = tx.update(grads, state, params)
  new = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
  np.testing.assert_array_equal(new['image']['w'], params['image']['w'])
  for path, lr in ((('text', 'w'), 0.05), (('text', 'head', 'w'), 0.025)):
    p, g = params, grads
    for k in path:
      p, g = p[k], g[k]
    got = new['text']['w'] if path == ('text', 'w') else new['text']['head']['w']
    np.testing.assert_allclose(got, _naive_adamw_step(p, g, lr, o, decay=True), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new['log_scale'], _naive_adamw_step(params['log_scale'], grads['log_scale'], 0.1, o,
                                                                 decay=False), rtol=1e-5)


def test_a_pattern_that_names_no_param_is_refused():
  from vlp.core.config import ConfigError
  from vlp.validation import param_patterns

  def check_patterns(o, params, init_only=()):
    c = base_config()
    c.optim.update(o)
    c.init.only = init_only
    param_patterns(c, params)
  o = _optim_cfg(frozen=('img/.*',))
  params = {'image': {'w': np.zeros((2, 2))}, 'text': {'w': np.zeros((2, 2))}}
  with pytest.raises(ConfigError, match=r"'optim.frozen': 'img/\.\*' matches no param.*top level: image, text"):
    check_patterns(o, params)
  check_patterns(_optim_cfg(frozen=('image/.*',), lr_mult=(('text/w', 2.0),)), params)
  with pytest.raises(ConfigError, match=r"'optim.lr_mult': entries are \(regex, factor > 0\)"):
    check_patterns(_optim_cfg(lr_mult=(('text/w', -1.0),)), params)
  with pytest.raises(ConfigError, match=r"'init.only': '\[' is not a regular expression"):
    check_patterns(_optim_cfg(), params, init_only=('[',))
