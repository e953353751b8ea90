"""Mixture-of-Experts MLP: routers, dispatch/combine, auxiliary losses.

Tokens are routed within groups (one group = one example's sequence, so the
group axis is the batch axis and shards with it). Routing builds one-hot
dispatch and weighted combine tensors [G, S, E, C] (S tokens, E experts, C
slots per expert) and everything else is einsums: expert weights are stacked
on an expert dimension with the logical name 'expert' (mapped to the `expert`
mesh axis), so sharding the experts turns the dispatch einsum into an
all-to-all and no Python loop over experts exists.

Routers (the router runs in float32, as in IMP/V-MoE: bf16 logits flip
argmaxes):
  'top_k'          token choice (Switch k=1, V-MoE/GShard k=2): each token
                   picks its k best experts; an expert takes tokens in
                   priority order until its capacity C = ceil(k * cf * S / E)
                   is full; the others are dropped (their MoE output is zero,
                   so the block's residual passes them through). Priority is
                   sequence order, or with batch_priority the tokens' top
                   gate, highest first (V-MoE's BPR). The k-th choices of all
                   tokens are placed before any (k+1)-th choice.
  'expert_choice'  each expert takes its top-C tokens by gate (Zhou et al.
                   2022; IMP): C = ceil(cf * S / E); perfectly balanced, a
                   token may get 0..E experts.
Gates are the router's softmax probabilities (not renormalised over the k
chosen, as V-MoE).

Auxiliary losses, reported per layer with the expert load:
  load_balance  Switch: E * sum_e f_e * P_e, f_e the fraction of tokens whose
                first choice is e, P_e the mean router probability of e;
                1.0 at uniform routing, its minimum. Zero for expert choice,
                which is balanced by construction.
  router_z      ST-MoE: mean over tokens of logsumexp(logits)^2.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.core import parallel
from vlp.models.params import param

ROUTERS = ('top_k', 'expert_choice')


def capacity(router: str, group_size: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Slots per expert and group."""
  slots = (k if router == 'top_k' else 1) * capacity_factor * group_size / num_experts
  return max(1, min(group_size, math.ceil(slots)))


def top_k_routing(probs, k: int, cap: int, batch_priority: bool = False):
  """Token choice. probs: [G, S, E] -> (dispatch bool [G,S,E,C], combine [G,S,E,C]).

  A token's position in an expert's buffer is the number of earlier
  assignments to that expert (earlier choice rank, then earlier priority);
  positions >= cap are dropped.
  """
  g, s, e = probs.shape
  if batch_priority:  # process tokens by their top gate, highest first
    order = jnp.argsort(-probs.max(-1), axis=-1)  # [G, S]
  else:
    order = jnp.broadcast_to(jnp.arange(s), (g, s))
  ordered = jnp.take_along_axis(probs, order[..., None], axis=1)
  remaining = ordered
  filled = jnp.zeros((g, e), jnp.int32)  # slots used per expert by earlier choices
  dispatch = jnp.zeros((g, s, e, cap), jnp.bool_)
  combine = jnp.zeros((g, s, e, cap), probs.dtype)
  for _ in range(k):
    expert = jnp.argmax(remaining, axis=-1)  # [G, S]
    onehot = jax.nn.one_hot(expert, e, dtype=jnp.int32)  # [G, S, E]
    position = (jnp.cumsum(onehot, axis=1) - 1 + filled[:, None, :]) * onehot  # [G, S, E]
    kept = onehot * (position < cap)
    slot = jax.nn.one_hot(position, cap, dtype=jnp.bool_) & kept[..., None].astype(jnp.bool_)
    gate = jnp.sum(ordered * onehot, axis=-1)  # [G, S]
    dispatch = dispatch | slot
    combine = combine + slot * gate[..., None, None]
    filled = filled + jnp.sum(onehot, axis=1)
    remaining = jnp.where(onehot.astype(jnp.bool_), -jnp.inf, remaining)
  # back from priority order to sequence order
  inverse = jnp.argsort(order, axis=-1)[..., None, None]
  return (jnp.take_along_axis(dispatch, inverse, axis=1),
          jnp.take_along_axis(combine, inverse, axis=1))


def expert_choice_routing(probs, cap: int):
  """Expert choice. probs: [G, S, E] -> (dispatch bool [G,S,E,C], combine [G,S,E,C])."""
  gates, tokens = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), cap)  # [G, E, C] each
  dispatch = jax.nn.one_hot(tokens, probs.shape[1], dtype=jnp.bool_)  # [G, E, C, S]
  dispatch = jnp.transpose(dispatch, (0, 3, 1, 2))  # [G, S, E, C]
  return dispatch, dispatch * gates[:, None]


def load_balance_loss(probs, first_choice):
  """Switch's E * sum_e f_e P_e over all tokens; probs [..., E], first_choice int [...]."""
  e = probs.shape[-1]
  f = jnp.mean(jax.nn.one_hot(first_choice, e, dtype=jnp.float32).reshape(-1, e), axis=0)
  p = jnp.mean(probs.reshape(-1, e), axis=0)
  return e * jnp.sum(f * p)


def router_z_loss(logits):
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


class MoeMlp(nnx.Module):
  """An MLP of `num_experts` experts; x [B, L, D] -> [B, L, D], routing within each example."""

  def __init__(self, width, mlp_dim, num_experts, *, rngs, router='expert_choice', k=1,
               capacity_factor=1.0, batch_priority=False, dtype=jnp.float32, activation=jax.nn.gelu):
    if router not in ROUTERS:
      raise ValueError(f'unknown router {router!r}; known: {ROUTERS}')
    self.router_kernel = param(rngs, nnx.initializers.normal(0.02), (width, num_experts),
                                      ('embed', None))
    init = nnx.initializers.xavier_uniform(in_axis=1, out_axis=2, batch_axis=(0,))
    self.w1 = param(rngs, init, (num_experts, width, mlp_dim), ('expert', 'embed', 'mlp'))
    self.b1 = param(rngs, nnx.initializers.zeros, (num_experts, mlp_dim), ('expert', 'mlp'))
    self.w2 = param(rngs, init, (num_experts, mlp_dim, width), ('expert', 'mlp', 'embed'))
    self.b2 = param(rngs, nnx.initializers.zeros, (num_experts, width), ('expert', 'embed'))
    self.router, self.k, self.capacity_factor = router, k, capacity_factor
    self.batch_priority, self.dtype, self.num_experts = batch_priority, dtype, num_experts
    self.activation = activation  # the dense MLP's (model.arch.gelu)

  def route(self, x):
    """x [G, S, D] -> (dispatch, combine [G,S,E,C], aux dict)."""
    logits = jnp.einsum('gsd,de->gse', x.astype(jnp.float32), self.router_kernel[...].astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    cap = capacity(self.router, x.shape[1], self.num_experts, self.k, self.capacity_factor)
    if self.router == 'top_k':
      dispatch, combine = top_k_routing(probs, self.k, cap, self.batch_priority)
      balance = load_balance_loss(probs, jnp.argmax(probs, axis=-1))
      assigned = self.k * x.shape[0] * x.shape[1]
    else:
      dispatch, combine = expert_choice_routing(probs, cap)
      balance = jnp.zeros((), jnp.float32)
      assigned = x.shape[0] * x.shape[1]
    per_expert = jnp.sum(dispatch, axis=(0, 1, 3)).astype(jnp.float32)  # tokens each expert took
    aux = {
        'load_balance': balance,
        'router_z': router_z_loss(logits),
        'expert_load': per_expert / jnp.sum(per_expert),  # fraction of routed tokens per expert
        # top_k: assignments dropped by capacity; expert_choice: tokens no expert took
        'drop_rate': (1.0 - jnp.sum(per_expert) / assigned if self.router == 'top_k'
                      else jnp.mean(~jnp.any(dispatch, axis=(2, 3)))),
    }
    return dispatch, combine, aux

  def __call__(self, x):
    dt = self.dtype
    dispatch, combine, aux = self.route(x)
    if hasattr(self, '__captures__'):  # inside nnx.capture (training): report to the loss
      self.sow(nnx.Intermediate, 'moe_aux', aux)
    # [G,S,E,C] x [G,S,D] -> per-expert buffers [E,G,C,D], experts over the `expert` axis
    buffers = jnp.einsum('gsec,gsd->egcd', dispatch.astype(dt), x.astype(dt))
    buffers = parallel.constrain(buffers, ('expert', 'batch', None, None))
    h = jnp.einsum('egcd,edm->egcm', buffers, self.w1[...].astype(dt)) + self.b1[...].astype(dt)[:, None, None]
    h = parallel.constrain(self.activation(h), ('expert', 'batch', None, 'mlp'))
    out = jnp.einsum('egcm,emd->egcd', h, self.w2[...].astype(dt)) + self.b2[...].astype(dt)[:, None, None]
    return jnp.einsum('gsec,egcd->gsd', combine.astype(dt), out)


def aux_losses(intermediates, weights) -> tuple[jax.Array, dict]:
  """The weighted auxiliary loss over the MoE layers of one forward pass, and per-layer metrics.

  intermediates: the nnx.Intermediate state that `nnx.capture` returned for
  the pass; weights: {'load_balance': w, 'router_z': w}. A dense model gives
  (0, {}).
  """
  total, metrics = jnp.zeros((), jnp.float32), {}
  for path, calls in nnx.to_flat_state(intermediates):
    if path[-1] != 'moe_aux':
      continue
    prefix = '/'.join(['moe', *map(str, path[:-1])])
    for aux in calls.get_value():  # one entry per call of the layer
      total = total + sum(weights[k] * aux[k] for k in ('load_balance', 'router_z'))
      for k in ('load_balance', 'router_z', 'drop_rate'):
        metrics[f'{prefix}/{k}'] = aux[k]
      metrics[f'{prefix}/max_expert_load'] = jnp.max(aux['expert_load'])
  return total, metrics
