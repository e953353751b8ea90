"""ALIGN / CLIP / SigLIP: a dual encoder trained with a softmax (ALIGN, CLIP) or sigmoid
(SigLIP, `model.head='sigmoid'`) contrastive loss over image-text pairs.

Every task is a contrastive image-text task (several give alternating
gradient descent over resolutions or data sources); the model keeps nothing
in the train state besides its params.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from vlp import losses
from vlp.core import config as config_lib, parallel
from vlp.core.config import check
from vlp.models import align as model_lib, layers, text as text_lib
from vlp.recipes import base
from vlp.recipes.align import flops


def towers() -> dict:
  """The image and text towers of a dual encoder (also ALBEF's)."""
  return dict(
      image=dict(image_size=64, patch_size=8, width=256, depth=4, num_heads=4, mlp_dim=1024,
                 pool='cls', moe=config_lib.moe_config(),
                 ln_pre=False, patch_bias=True),  # CLIP's ViT: a LayerNorm before the encoder, no patch bias
      text=dict(vocab_size=1024, context_length=32, width=256, depth=4, num_heads=4, mlp_dim=1024,
                moe=config_lib.moe_config()),
      embed_dim=256,
  )


def contrastive(image_emb, text_emb, scale, bias, head: str, label_smoothing: float, chunk: int,
                impl: str = 'gather'):
  """The softmax or sigmoid loss, on a ring of the batch devices (impl='ring') or against the
  gathered text, over each device's rows or in row blocks of `chunk`."""
  if impl == 'ring':
    if head == 'softmax':
      return losses.ring_softmax_contrastive(image_emb, text_emb, scale, label_smoothing)
    return losses.ring_sigmoid_contrastive(image_emb, text_emb, scale, bias)
  if head == 'softmax':
    if chunk:
      return losses.chunked_softmax_contrastive(image_emb, text_emb, scale, label_smoothing, chunk)
    return losses.softmax_contrastive(image_emb, text_emb, scale, label_smoothing)
  if chunk:
    return losses.chunked_sigmoid_contrastive(image_emb, text_emb, scale, bias, chunk)
  return losses.sigmoid_contrastive(image_emb, text_emb, scale, bias)


def tower_activation_bytes(config, towers_, batch: int, sizes: dict) -> float:
  """Per-device activations of the (tower section, sequence length) stacks for `batch` examples."""
  m = config.model
  shards = sizes['data'] * sizes['fsdp']
  return sum(parallel.stack_activation_bytes(t, length, batch // shards, m.remat, sizes['tensor'],
                                             jnp.dtype(m.dtype).itemsize) for t, length in towers_)


def both_towers_bytes(config, variant, sizes: dict) -> tuple[float, int]:
  """(per-device activations of the image and text towers on one micro-batch, the micro-batch)."""
  m = config.model
  batch = variant.batch_size // variant.accum_steps
  seq = (variant.image_size // m.image.patch_size) ** 2 + int(m.image.get('cls_token', True))
  return tower_activation_bytes(config, [(m.image, seq), (m.text, m.text.context_length)], batch, sizes), batch


HEALTH_ROWS = 256  # in-batch accuracy from this many rows: O(rows x B) however large the batch


def in_batch_accuracy(image_emb, text_emb) -> dict:
  """The contrastive loss's in-batch top-1 accuracy both ways: the first HEALTH_ROWS pairs
  against the whole batch (O(rows x B) however large the batch)."""
  image_emb, text_emb = jax.lax.stop_gradient(image_emb), jax.lax.stop_gradient(text_emb)
  rows = min(HEALTH_ROWS, image_emb.shape[0])
  diag = jnp.arange(rows)
  accuracy = lambda queries, keys: jnp.mean(jnp.argmax(queries[:rows] @ keys.T, axis=1) == diag)
  return {'batch_acc_i2t': accuracy(image_emb, text_emb), 'batch_acc_t2i': accuracy(text_emb, image_emb)}


def health_metrics(image_raw, text_raw, image_emb, text_emb, scale, bias) -> dict:
  """What shows a contrastive model learning or stuck: the temperature (and bias), the
  embeddings' norms before normalisation, and the in-batch accuracy both ways."""
  norm = lambda x: jnp.mean(jnp.linalg.norm(jax.lax.stop_gradient(x).astype(jnp.float32), axis=-1))
  metrics = {'logit_scale': scale, 'image_norm': norm(image_raw), 'text_norm': norm(text_raw),
             **in_batch_accuracy(image_emb, text_emb)}
  if bias is not None:
    metrics['logit_bias'] = bias
  return metrics


def validate_token_ids(text):
  """model.text.pad_id and eos_id are ids of the vocabulary (eos_id -1: none); pool='eos' alone
  reads eos_id."""
  for key, lowest in (('pad_id', 0), ('eos_id', text_lib.NO_EOS)):
    value = text[key]
    check(isinstance(value, int) and not isinstance(value, bool) and lowest <= value < text.vocab_size,
          f'model.text.{key}', f'must be an int in [{lowest}, vocab_size {text.vocab_size}), got {value!r}')
  check(text.eos_id == text_lib.NO_EOS or text.pool == 'eos', 'model.text.eos_id',
        f"is read by pool='eos' alone (pool is {text.pool!r}): leave it at {text_lib.NO_EOS}")


class Align(base.Recipe):
  name = 'align'

  def config_sections(self):
    model = towers()
    # CLIP's text layout (causal, pooled at [SEP]); ALIGN's paper: causal=False, pool='cls'
    # padding_mask=False and pool='last': SigLIP's (unmasked fixed-length captions)
    # pad_id: the id captions are padded with; eos_id: the end token pool='eos' takes the first
    # of, as transformers' CLIP does (-1: vlp's captions, pooled at the last token before
    # padding); pool='argmax': the highest id (open_clip's CLIP). vlp import sets an import's.
    model['text'].update(causal=True, pool='eos', padding_mask=True, pad_id=text_lib.PAD_ID,
                         eos_id=text_lib.NO_EOS)
    # the image pooled by the mean of its patch tokens (big_vision's 'gap'): +2.65 RSUM at align_tiny
    # against CLIP's [CLS] token (docs/results.md); pool='cls' is CLIP's and ALIGN's
    # (SigLIP's: 'map' without a CLS token, cls_token=False)
    model['image'].update(pool='gap', cls_token=True)
    return {'model': dict(
        model,
        head='softmax',  # 'softmax' (ALIGN/CLIP) or 'sigmoid' (SigLIP)
        # the temperature's start; 0: the head's own (softmax: CLIP's 1/0.07, sigmoid: 10).
        # ALIGN's paper starts at 1.0, which small batches learn far too slowly.
        logit_scale_init=0.0,
        logit_bias_init=-10.0,  # sigmoid head (SigLIP)
        image_proj=True,  # False: the pooled image feature is the embedding (SigLIP; image.width == embed_dim)
        proj_bias=False,  # a bias on the projections (SigLIP's text head)
        arch=dict(init='xavier', gelu='erf', ln_eps=1e-5),  # vlp.models.layers.Arch; 'clip' init: -9 RSUM here
    ), 'optim': dict(no_decay=())}  # position embeddings decay too, as open_clip's: +2.5 RSUM at align_tiny

  def validate(self, config, tasks=()):
    m = config.model
    base.validate_towers(config)
    check(m.head in ('softmax', 'sigmoid'), 'model.head', f"{m.head!r} not in softmax/sigmoid")
    check(m.text.pool in text_lib.POOLS, 'model.text.pool', f"{m.text.pool!r} not in {'/'.join(text_lib.POOLS)}")
    check(isinstance(m.text.causal, bool), 'model.text.causal', f'must be True or False, got {m.text.causal!r}')
    check(not (m.text.causal and m.text.pool == 'cls'), 'model.text.pool',
          "'cls' under causal attention sees only [CLS] itself: use pool='eos'")
    validate_token_ids(m.text)
    for key, value in (('text.padding_mask', m.text.padding_mask), ('image.cls_token', m.image.cls_token),
                       ('image_proj', m.image_proj), ('proj_bias', m.proj_bias)):
      check(isinstance(value, bool), f'model.{key}', f'must be True or False, got {value!r}')
    check(m.image_proj or m.image.width == m.embed_dim, 'model.image_proj',
          f'False needs image.width == embed_dim, got {m.image.width} and {m.embed_dim}')
    check(m.logit_scale_init >= 0, 'model.logit_scale_init', 'must be >= 0 (0: the head\'s default)')
    base.validate_arch(m.arch)
    for task in tasks:
      base.image_text_only(task, 'a dual encoder')

  def build(self, model_cfg, seed=0):
    return model_lib.Model(model_cfg, rngs=nnx.Rngs(seed))

  def loss(self, graphdef, params, model_state, batch, step, config, variant):
    del step
    model = nnx.merge(graphdef, params)
    # capture: what MoE layers report of the pass (vlp.models.moe)
    (image_raw, text_raw), intermediates = nnx.capture(lambda m, i, t: m.project(i, t), nnx.Intermediate)(
        model, batch['image'], batch['text'])
    image_emb, text_emb = layers.l2_normalize(image_raw), layers.l2_normalize(text_raw)
    scale = jnp.minimum(model.logit_scale(), layers.MAX_LOGIT_SCALE)
    loss = contrastive(image_emb, text_emb, scale, model.logit_bias(), config.model.head,
                       variant.cfg.label_smoothing, config.loss.chunk_size, config.loss.impl)
    moe_loss, moe_metrics = base.moe_aux(intermediates, config.loss)
    metrics = health_metrics(image_raw, text_raw, image_emb, text_emb, scale, model.logit_bias())
    if moe_metrics:  # an MoE model: the loss includes its auxiliary losses
      metrics.update(contrastive_loss=loss, **moe_metrics)
    return loss + moe_loss, (metrics, model_state)

  def train_flops(self, config, variant):
    return flops.train_flops(config.model, variant.batch_size)

  def activation_bytes(self, config, variant, sizes):
    """Both towers on one micro-batch, plus the contrastive loss's temporaries (vlp.losses)."""
    m = config.model
    total, batch = both_towers_bytes(config, variant, sizes)
    return total + losses.temp_bytes(m.head, config.loss.impl, batch, sizes['data'] * sizes['fsdp'],
                                     m.embed_dim, config.loss.chunk_size)


RECIPE = Align()
__all__ = ['RECIPE', 'Align', 'contrastive', 'in_batch_accuracy', 'towers']
