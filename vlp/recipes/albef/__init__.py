"""ALBEF (Li et al. 2021): align before fuse, with momentum distillation.

Follows salesforce/ALBEF `models/model_pretrain.py`. The train state's
model_state holds the momentum (EMA) copy of image encoder, projections and
the whole text stack with its MLM head (ALBEF's `model_pairs`; not the ITM
head, not the temperature) and the image/text feature queues with their
pointer; they move inside the step, without gradients. The loss is ITC
against the queues with distillation, ITM on hard negatives and MLM
distilled from the momentum model (vlp.recipes.albef.losses). Evaluation
re-ranks retrieval candidates with the ITM head (`itm_rerank` evaluators).

As ALBEF starts from bert-base-uncased, `init.text_from=DIR` starts the text stack
from a BERT import (`vlp import` of a transformers BertModel or BertForMaskedLM):
BERT's layers below fusion_layer become the text-only blocks, the others the fusion
blocks' self-attention and MLP (their cross-attention starts fresh), and its MLM head
ALBEF's. The stack must be in BERT's layout (model.text.post_ln) and the captions in
BERT's vocabulary (data.tokenizer=DIR/tokenizer.json).
"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlp.core import config as config_lib, paths
from vlp.core.config import ConfigError, check
from vlp.models import albef as model_lib, layers
from vlp.models.text import PAD_ID
from vlp.recipes import align, base
from vlp.recipes.albef import flops, losses, masking

MOMENTUM_KEYS = ('image', 'image_proj', 'text', 'text_proj', 'mlm_head')


def ema(momentum, online, m):
  """m * momentum + (1 - m) * online, leaf by leaf; no gradient flows to the online params."""
  return jax.tree.map(lambda a, b: (m * a + (1 - m) * jax.lax.stop_gradient(b)).astype(a.dtype),
                      momentum, online)


def enqueue(queue, ptr, feats):
  """Writes feats [B, D] at rows ptr..ptr+B of queue [Q, D]; returns (queue, next ptr).

  Q is a multiple of every batch size (checked in the config), so a batch never straddles the end.
  """
  queue = jax.lax.dynamic_update_slice(queue, feats.astype(queue.dtype), (ptr, 0))
  return queue, (ptr + feats.shape[0]) % queue.shape[0]


def alpha_at(step, a):
  """Distillation weight: linear from 0 to `a.alpha` over `a.alpha_warmup_steps` steps."""
  if a.alpha_warmup_steps == 0:
    return jnp.float32(a.alpha)
  return a.alpha * jnp.minimum(1.0, step.astype(jnp.float32) / a.alpha_warmup_steps)


def clamped_temperature(t):
  """ALBEF clamps the temperature in place before the forward pass; the gradient is that of
  the clamped value (straight through)."""
  return t + jax.lax.stop_gradient(jnp.clip(t, *model_lib.TEMP_RANGE) - t)


def itm_inputs(text_hidden, mask, image_tokens, neg_image, neg_text):
  """ITM's 3B pairs: the B positives, each text with a hard negative image, each image with
  a hard negative text; and their labels."""
  b = text_hidden.shape[0]
  pairs = (jnp.concatenate([text_hidden, text_hidden, text_hidden[neg_text]]),
           jnp.concatenate([mask, mask, mask[neg_text]]),
           jnp.concatenate([image_tokens, image_tokens[neg_image], image_tokens]))
  return pairs, jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])


def _towers():
  towers = align.towers()
  towers['text']['post_ln'] = False
  return towers


class Albef(base.Recipe):
  name = 'albef'
  eval_kinds = ('retrieval', 'zeroshot', 'itm_rerank')
  identity_keys = ('albef.queue_size', 'albef.mlm_prob')
  accumulates = False  # the momentum model and the queues move once per step, not per micro-batch

  def config_sections(self):
    return {
        # text layers below fusion_layer encode text alone, layers from it on (up to
        # text.depth) add cross-attention to the image tokens
        # vlp.models.layers.Arch: exact GELU, LayerNorm eps 1e-5 and every matrix decayed (as ALIGN's):
        # +5.5 ITC RSUM, +3.9 after ITM + ITC re-ranking at albef_tiny (docs/results.md)
        # text.post_ln: BERT's layout (vlp.models.albef.TextStack), to start from a BERT import
        'model': dict(_towers(), fusion_layer=2, arch=dict(init='xavier', gelu='erf', ln_eps=1e-5)),
        'optim': dict(no_decay=()),
        # ALBEF training (Li et al. 2021, configs/Pretrain.yaml)
        'albef': dict(
            momentum=0.995,  # EMA factor of the momentum model
            queue_size=65536,  # momentum features kept per modality; a multiple of every batch size
            alpha=0.4,  # distillation weight after the ramp
            alpha_warmup_steps=1000,  # linear ramp of alpha from 0 (ALBEF: the first epoch)
            mlm_prob=0.15,  # share of non-special tokens masked (80% [MASK], 10% random, 10% kept)
        ),
        # ITC retrieval, then the top rerank_k candidates re-ranked by the ITM head
        'evals': dict(retrieval=config_lib.eval_config('itm_rerank')),
        'init': dict(text_from=''),  # a BERT import the text stack and MLM head start from
    }

  def validate(self, config, tasks=()):
    base.validate_towers(config)
    m, a = config.model, config.albef
    base.validate_arch(m.arch)
    check(isinstance(m.fusion_layer, int) and 0 <= m.fusion_layer < m.text.depth, 'model.fusion_layer',
          f'{m.fusion_layer!r} must be in [0, text.depth = {m.text.depth}): at least one fusion layer')
    check(0.0 <= a.momentum < 1.0, 'albef.momentum', 'must be in [0, 1)')
    check(0.0 <= a.alpha <= 1.0, 'albef.alpha', 'must be in [0, 1]')
    check(a.alpha_warmup_steps >= 0, 'albef.alpha_warmup_steps', 'must be >= 0')
    check(0.0 < a.mlm_prob < 1.0, 'albef.mlm_prob', 'must be in (0, 1)')
    check(config.loss.chunk_size == 0, 'loss.chunk_size', 'ALIGN only; ALBEF contrasts against its queues')
    check(config.loss.impl == 'gather', 'loss.impl', 'ALIGN only; ALBEF contrasts against its queues')
    check(isinstance(m.text.post_ln, bool), 'model.text.post_ln', f'must be True or False, got {m.text.post_ln!r}')
    if config.init.text_from:
      check(m.text.post_ln, 'model.text.post_ln', 'init.text_from starts the text stack from BERT, which is '
            'post-LN: set it to True')
      check(config.data.tokenizer.endswith('.json'), 'data.tokenizer', 'init.text_from starts the text stack from '
            "BERT: read captions in its vocabulary with the import's tokenizer.json (DIR/tokenizer.json)")
    for task in tasks:
      base.image_text_only(task, 'ALBEF')
      batch, q = task.cfg.batch_size, a.queue_size
      check(batch >= 2, task.key('batch_size'), 'ALBEF draws in-batch hard negatives: needs >= 2')
      check(q > 0 and q % batch == 0, 'albef.queue_size',
            f'{q} is not a positive multiple of the batch size {batch} (each step enqueues one global batch)')

  def init_sources(self, config):
    """init.text_from: a BERT import's layers, embeddings and MLM head, renamed into the text stack;
    its position table cut to the captions' context (BERT has 512 positions, ALBEF reads 30)."""
    source = config.init.text_from
    if not source:
      return []
    _check_bert_source(config.model, source)
    fusion, context = config.model.fusion_layer, config.model.text.context_length

    def convert(name, value):
      block = re.fullmatch(r'text/text_blocks/(\d+)/(.*)', name)
      if block and int(block[1]) >= fusion:
        return f'text/fusion_blocks/{int(block[1]) - fusion}/{block[2]}', value
      if name == 'text/pos_embed':
        return name, value[:context]
      return (name, value) if name.startswith(('text/', 'mlm_head/')) else None  # BERT's pooler is not ALBEF's
    return [('init.text_from', source, convert)]

  def build(self, model_cfg, seed=0):
    return model_lib.Model(model_cfg, rngs=nnx.Rngs(seed))

  def batch_spec(self, config, variant):
    spec = super().batch_spec(config, variant)
    return {**spec, 'mlm_text': spec['text'], 'mlm_labels': spec['text']}

  def example_transform(self, config, variant, tokenizer):
    """The MLM inputs of every example, masked with its own random generator (resumable)."""
    if tokenizer is None:  # random batches: vlp's own special ids over the model's vocabulary
      return masking.MlmMasking(config.albef.mlm_prob, config.model.text.vocab_size)
    return masking.MlmMasking(config.albef.mlm_prob, tokenizer.vocab_size, tokenizer.mask_id, tokenizer.special_ids)

  def init_model_state(self, config, params):
    """Momentum copy of the params (as ALBEF's copy_params) and queues of random unit features."""
    q, d = config.albef.queue_size, config.model.embed_dim
    k_image, k_text = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
    queue = lambda k: layers.l2_normalize(jax.random.normal(k, (q, d)))
    return {'momentum': {k: params[k] for k in MOMENTUM_KEYS},
            'image_queue': queue(k_image), 'text_queue': queue(k_text),
            'queue_ptr': jnp.zeros((), jnp.int32)}

  def loss(self, graphdef, params, model_state, batch, step, config, variant):
    """ITC + ITM + MLM (+ the MoE auxiliary losses of MoE towers) of one global batch."""
    a, state = config.albef, model_state
    model = nnx.merge(graphdef, params)
    # The momentum model moves first, then gives this step's targets (ALBEF's order).
    momentum = ema(state['momentum'], {k: params[k] for k in MOMENTUM_KEYS}, a.momentum)
    model_m = nnx.merge(graphdef, {**jax.lax.stop_gradient(params), **momentum})
    alpha, temp = alpha_at(step, a), clamped_temperature(params['temp'])
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
      itc, sim_i2t, sim_t2i = losses.itc_loss(image_feat, text_feat, image_feat_m, text_feat_m,
                                              state['image_queue'], state['text_queue'], temp, alpha)
      # hard negatives drawn with a key fixed by seed and step
      b = tokens.shape[0]
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), step)
      neg_image, neg_text = losses.sample_itm_negatives(key, sim_i2t[:, :b], sim_t2i[:, :b])
      pairs, itm_labels = itm_inputs(text_hidden, mask, image_tokens, neg_image, neg_text)
      itm_logits = model.itm_logits(*pairs)
      itm = losses.itm_loss(itm_logits, itm_labels)
      mlm = losses.mlm_loss(model.mlm_logits(batch['mlm_text'], image_tokens), batch['mlm_labels'],
                            mlm_logits_m, alpha)
      health = {'itm_acc': jnp.mean(jnp.argmax(itm_logits, axis=-1) == itm_labels),
                **align.in_batch_accuracy(image_feat, text_feat)}  # ITC's, within the batch
      return itc, itm, mlm, health

    # capture: what the online model's MoE layers report (the momentum model's are not trained)
    (itc, itm, mlm, health), intermediates = nnx.capture(online, nnx.Intermediate)(model)
    moe_loss, moe_metrics = base.moe_aux(intermediates, config.loss)
    image_queue, ptr = enqueue(state['image_queue'], state['queue_ptr'], image_feat_m)
    text_queue, _ = enqueue(state['text_queue'], state['queue_ptr'], text_feat_m)
    new_state = {'momentum': momentum, 'image_queue': image_queue, 'text_queue': text_queue, 'queue_ptr': ptr}
    metrics = {'loss_itc': itc, 'loss_itm': itm, 'loss_mlm': mlm, 'temp': temp, 'alpha': alpha,
               **health, **moe_metrics}
    return itc + itm + mlm + moe_loss, (metrics, new_state)

  def predict_fns(self, graphdef):
    """The embeddings, and what ITM re-ranking needs: image tokens, text hidden states, the
    ITM logits of (text, image) pairs and the clamped ITC temperature."""
    model = lambda p: nnx.merge(graphdef, p)
    return {**super().predict_fns(graphdef),
            'image_tokens': lambda p, x: model(p).image.tokens(x),
            'text_hidden': lambda p, t: model(p).text.encode(t),
            'itm_logits': lambda p, h, m, x: model(p).itm_logits(h, m, x),
            'itc_temperature': lambda p: float(np.clip(jax.device_get(p['temp']), *model_lib.TEMP_RANGE))}

  def train_flops(self, config, variant):
    return flops.train_flops(config.model, variant.batch_size, config.albef.queue_size)

  def activation_bytes(self, config, variant, sizes):
    """Both unimodal towers on one micro-batch plus ITC's logits; the fusion passes (3B ITM
    pairs, MLM) are not in the estimate."""
    towers, batch = align.both_towers_bytes(config, variant, sizes)
    # ITC (vlp.recipes.albef.losses.itc_loss): each device's rows against the gathered momentum
    # features and the queue, [r, B + Q] per direction, with their gradients and targets (float32)
    rows = batch // (sizes['data'] * sizes['fsdp'])
    return towers + 4 * 3 * 2 * rows * (batch + config.albef.queue_size)


def _check_bert_source(model, source: str):
  """The source is a BERT import of the text stack's depth, activation and LayerNorm eps."""
  try:
    with paths.open(paths.join(source, 'config.json')) as f:
      given = json.load(f)['model']
  except (OSError, KeyError, ValueError) as e:
    raise ConfigError(f"config key 'init.text_from': {source} is not a vlp import of BERT ({e})") from None
  if 'image' in given or not given.get('text', {}).get('post_ln'):  # a text encoder alone, in BERT's layout
    raise ConfigError(f"config key 'init.text_from': {source} is a {given.get('name')!r} model, not a BERT import "
                      '(vlp import of a transformers BertModel)')
  ours = {'model.text.depth': model.text.depth, 'model.arch.gelu': model.arch.gelu,
          'model.arch.ln_eps': model.arch.ln_eps}
  theirs = {'model.text.depth': given['text']['depth'], 'model.arch.gelu': given['arch']['gelu'],
            'model.arch.ln_eps': given['arch']['ln_eps']}
  for key in ours:
    if ours[key] != theirs[key]:
      raise ConfigError(f"config key '{key}': {ours[key]!r}, but the BERT of init.text_from ({source}) has "
                        f'{theirs[key]!r}')


RECIPE = Albef()
