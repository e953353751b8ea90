"""ALBEF (Li et al. 2021): align before fuse, with momentum distillation.

Follows salesforce/ALBEF `models/model_pretrain.py`: a ViT image encoder; one
BERT-style text stack split at `fusion_layer` (layers below it encode text
alone, layers from it on add cross-attention to the image tokens); 256-d
L2-normalised projections of both CLS tokens for ITC; a 2-way ITM head on the
fusion CLS; an MLM head tied to the token embedding. Differences, on purpose:
pre-LayerNorm blocks as the rest of vlp (BERT is post-LN), and the text stack
starts from scratch (ALBEF loads bert-base).

The train state holds, besides params and optimizer state, the momentum (EMA)
copy of image encoder, projections and the whole text stack with its MLM head
(ALBEF's `model_pairs`; not the ITM head, not the temperature) and the
image/text feature queues with their pointer. They are updated inside the
step without gradients: `init_extra_state` and `loss_fn` are this model's
hooks into vlp.train.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from vlp import losses_albef
from vlp.models import layers, moe
from vlp.models.align import _l2_normalize
from vlp.models.text import PAD_ID
from vlp.models.vit import ViT

BATCH_KEYS = ('image', 'text', 'mlm_text', 'mlm_labels')  # what a training batch holds
MOMENTUM_KEYS = ('image', 'image_proj', 'text', 'text_proj', 'mlm_head')
TEMP_RANGE = (0.001, 0.5)


class TextStack(nnx.Module):
  """Token + position embeddings, `fusion_layer` text-only blocks, then fusion blocks;
  `moe` (model.text.moe) picks MoE blocks over the whole stack of `depth` blocks."""

  def __init__(self, vocab_size, context_length, width, depth, num_heads, mlp_dim, *,
               fusion_layer, image_width, rngs, dtype=jnp.float32, remat='none', moe=None):
    self.dtype, self.remat = dtype, remat
    self.token_embed = layers.param(rngs, nnx.initializers.normal(0.02), (vocab_size, width),
                                    ('vocab', 'embed'))
    self.pos_embed = layers.param(rngs, nnx.initializers.normal(0.01), (context_length, width),
                                  (None, 'embed'))
    experts = [layers.moe_kwargs(moe) if is_moe else None for is_moe in layers.moe_blocks(depth, moe)]
    self.text_blocks = nnx.List([layers.Block(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype, moe=experts[i])
                                 for i in range(fusion_layer)])
    self.text_ln = layers.LayerNorm(width, rngs=rngs, dtype=dtype)
    self.fusion_blocks = nnx.List([
        layers.FusionBlock(width, num_heads, mlp_dim, image_width, rngs=rngs, dtype=dtype, moe=experts[i])
        for i in range(fusion_layer, depth)])
    self.fusion_ln = layers.LayerNorm(width, rngs=rngs, dtype=dtype)

  def encode(self, tokens):
    """int [B, L] -> text-only hidden states [B, L, width] (the text encoder's output)."""
    length = tokens.shape[1]
    if length > self.pos_embed.shape[0]:
      raise ValueError(f'text length {length} exceeds context_length {self.pos_embed.shape[0]}')
    x = (jnp.take(self.token_embed[...], tokens, axis=0) + self.pos_embed[...][:length]).astype(self.dtype)
    apply = layers.remat_apply(self.remat)
    for block in self.text_blocks:
      x = apply(block, x, tokens != PAD_ID)
    return self.text_ln(x)

  def fuse(self, text_hidden, mask, image_tokens):
    """Fusion encoder: text hidden states [B, L, D] attend to image tokens [B, S, D_img]."""
    apply = layers.remat_apply(self.remat)
    x = text_hidden
    for block in self.fusion_blocks:
      x = apply(block, x, mask, image_tokens)
    return self.fusion_ln(x)


class MlmHead(nnx.Module):
  """BERT's prediction head: dense + GELU + LayerNorm, decoder tied to the token embedding."""

  def __init__(self, width, vocab_size, *, rngs, dtype=jnp.float32):
    self.dense = layers.Dense(width, width, ('embed', None), rngs=rngs, dtype=dtype)
    self.ln = layers.LayerNorm(width, rngs=rngs, dtype=dtype)
    self.bias = layers.param(rngs, nnx.initializers.zeros, (vocab_size,), ('vocab',))
    self.dtype = dtype

  def __call__(self, x, token_embed):
    h = self.ln(jax.nn.gelu(self.dense(x)))
    return jnp.einsum('bld,vd->blv', h, token_embed.astype(self.dtype)) + self.bias[...].astype(self.dtype)


class Model(nnx.Module):

  def __init__(self, cfg, *, rngs):
    dtype = jnp.dtype(cfg.dtype)
    remat = cfg.get('remat', 'none')
    self.image = ViT(**cfg.image, rngs=rngs, dtype=dtype, remat=remat)
    self.text = TextStack(**cfg.text, fusion_layer=cfg.fusion_layer, image_width=cfg.image.width,
                          rngs=rngs, dtype=dtype, remat=remat)
    self.image_proj = layers.Dense(cfg.image.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs, dtype=dtype)
    self.text_proj = layers.Dense(cfg.text.width, cfg.embed_dim, ('embed', 'proj'), rngs=rngs, dtype=dtype)
    self.itm_head = layers.Dense(cfg.text.width, 2, ('embed', None), rngs=rngs, dtype=dtype)
    self.mlm_head = MlmHead(cfg.text.width, cfg.text.vocab_size, rngs=rngs, dtype=dtype)
    self.temp = nnx.Param(jnp.asarray(0.07, jnp.float32))

  def image_feat(self, image_tokens):
    return _l2_normalize(self.image_proj(self.image.pool_tokens(image_tokens)))

  def text_feat(self, text_hidden):
    return _l2_normalize(self.text_proj(text_hidden[:, 0]))

  def encode_image(self, images):
    return self.image_feat(self.image.tokens(images))

  def encode_text(self, tokens):
    return self.text_feat(self.text.encode(tokens))

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)

  def itm_logits(self, text_hidden, mask, image_tokens):
    """[B, 2] match logits (1 = the text describes the image) of text/image pairs."""
    return self.itm_head(self.text.fuse(text_hidden, mask, image_tokens)[:, 0]).astype(jnp.float32)

  def mlm_logits(self, tokens, image_tokens):
    """[B, L, vocab] logits of the whole text stack on (masked) tokens, conditioned on the image."""
    fused = self.text.fuse(self.text.encode(tokens), tokens != PAD_ID, image_tokens)
    return self.mlm_head(fused, self.text.token_embed[...])


def init_extra_state(config, params):
  """Momentum copy of the params (as ALBEF's copy_params) and queues of random unit features."""
  q, d = config.albef.queue_size, config.model.embed_dim
  k_image, k_text = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  queue = lambda k: _l2_normalize(jax.random.normal(k, (q, d)))
  return {'momentum': {k: params[k] for k in MOMENTUM_KEYS},
          'image_queue': queue(k_image), 'text_queue': queue(k_text),
          'queue_ptr': jnp.zeros((), jnp.int32)}


def ema(momentum, online, m):
  """m * momentum + (1 - m) * online, leaf by leaf; no gradient flows to the online params."""
  return jax.tree.map(lambda a, b: (m * a + (1 - m) * jax.lax.stop_gradient(b)).astype(a.dtype),
                      momentum, online)


def enqueue(queue, ptr, feats):
  """Writes feats [B, D] at rows ptr..ptr+B of queue [Q, D]; returns (queue, next ptr).

  Q is a multiple of B (checked in the config), so a batch never straddles the end.
  """
  queue = jax.lax.dynamic_update_slice(queue, feats.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + feats.shape[0]) % queue.shape[0]


def alpha_at(step, a):
  """Distillation weight: linear from 0 to `a.alpha` over `a.alpha_warmup_steps` steps."""
  if a.alpha_warmup_steps == 0:
    return jnp.float32(a.alpha)
  return a.alpha * jnp.minimum(1.0, step.astype(jnp.float32) / a.alpha_warmup_steps)


def loss_fn(graphdef, params, extra, batch, step, config):
  """ITC + ITM + MLM (+ the MoE auxiliary losses of MoE towers) of one global batch;
  returns (loss, (metrics, new extra state))."""
  a = config.albef
  model = nnx.merge(graphdef, params)
  # The momentum model moves first, then gives this step's targets (ALBEF's order).
  momentum = ema(extra['momentum'], {k: params[k] for k in MOMENTUM_KEYS}, a.momentum)
  model_m = nnx.merge(graphdef, {**jax.lax.stop_gradient(params), **momentum})
  alpha = alpha_at(step, a)
  # ALBEF clamps the temperature in place before the forward pass; the gradient
  # is that of the clamped value (straight through).
  t = params['temp']
  temp = t + jax.lax.stop_gradient(jnp.clip(t, *TEMP_RANGE) - t)

  images, tokens = batch['image'], batch['text']
  mask = tokens != PAD_ID
  image_tokens_m = jax.lax.stop_gradient(model_m.image.tokens(images))
  image_feat_m = jax.lax.stop_gradient(model_m.image_feat(image_tokens_m))
  text_feat_m = jax.lax.stop_gradient(model_m.encode_text(tokens))
  mlm_logits_m = jax.lax.stop_gradient(model_m.mlm_logits(batch['mlm_text'], image_tokens_m))

  def online(model):
    image_tokens = model.image.tokens(images)
    text_hidden = model.text.encode(tokens)
    image_feat, text_feat = model.image_feat(image_tokens), model.text_feat(text_hidden)
    itc, sim_i2t, sim_t2i = losses_albef.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                                  extra['image_queue'], extra['text_queue'], temp, alpha)
    # ITM: B positive pairs, then for each text a hard negative image and for
    # each image a hard negative text, drawn with a key fixed by seed and step.
    b = tokens.shape[0]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), step)
    neg_image, neg_text = losses_albef.sample_itm_negatives(key, sim_i2t[:, :b], sim_t2i[:, :b])
    itm_logits = model.itm_logits(
        jnp.concatenate([text_hidden, text_hidden, text_hidden[neg_text]]),
        jnp.concatenate([mask, mask, mask[neg_text]]),
        jnp.concatenate([image_tokens, image_tokens[neg_image], image_tokens]))
    itm_labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    itm = losses_albef.itm_loss(itm_logits, itm_labels)
    mlm_logits = model.mlm_logits(batch['mlm_text'], image_tokens)
    mlm = losses_albef.mlm_loss(mlm_logits, batch['mlm_labels'], mlm_logits_m, alpha)
    return itc, itm, mlm, jnp.mean(jnp.argmax(itm_logits, axis=-1) == itm_labels)

  # capture: what the online model's MoE layers report (the momentum model's are not trained)
  (itc, itm, mlm, itm_acc), intermediates = nnx.capture(online, nnx.Intermediate)(model)
  moe_loss, moe_metrics = moe.aux_losses(intermediates, {'load_balance': config.loss.moe_load_balance,
                                                         'router_z': config.loss.moe_router_z})
  image_queue, ptr = enqueue(extra['image_queue'], extra['queue_ptr'], image_feat_m)
  text_queue, _ = enqueue(extra['text_queue'], extra['queue_ptr'], text_feat_m)
  new_extra = {'momentum': momentum, 'image_queue': image_queue, 'text_queue': text_queue, 'queue_ptr': ptr}
  metrics = {'loss_itc': itc, 'loss_itm': itm, 'loss_mlm': mlm, 'temp': temp, 'alpha': alpha,
             'itm_acc': itm_acc, **moe_metrics}
  return itc + itm + mlm + moe_loss, (metrics, new_extra)
