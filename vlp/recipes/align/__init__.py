"""ALIGN / CLIP / SigLIP: a dual encoder trained with a softmax (ALIGN, CLIP) or sigmoid
(SigLIP, `model.head='sigmoid'`) contrastive loss over image-text pairs.

Every task is a contrastive image-text task (several give alternating
gradient descent over resolutions or data sources); the model keeps nothing
in the train state besides its params.
"""
import jax.numpy as jnp
from flax import nnx

from vlp import config as config_lib, losses, parallel
from vlp.bench import flops
from vlp.config import check
from vlp.models import align as model_lib, layers
from vlp.recipes import base


def towers() -> dict:
  """The image and text towers of a dual encoder (also ALBEF's)."""
  return dict(
      image=dict(image_size=64, patch_size=8, width=256, depth=4, num_heads=4, mlp_dim=1024,
                 pool='cls', moe=config_lib.moe_config()),
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


class Align(base.Recipe):
  name = 'align'

  def config_sections(self):
    return {'model': dict(towers(), head='softmax')}  # 'softmax' (ALIGN/CLIP) or 'sigmoid' (SigLIP)

  def validate(self, config):
    base.validate_towers(config)
    check(config.model.head in ('softmax', 'sigmoid'), 'model.head', f"{config.model.head!r} not in softmax/sigmoid")

  def check_task(self, config, key, task):
    base.image_text_only(key, task, 'a dual encoder')

  def build(self, model_cfg, seed=0):
    return model_lib.Model(model_cfg, rngs=nnx.Rngs(seed))

  def loss(self, graphdef, params, model_state, batch, step, config, variant):
    del step
    model = nnx.merge(graphdef, params)
    # capture: what MoE layers report of the pass (vlp.models.moe)
    (image_emb, text_emb), intermediates = nnx.capture(lambda m, i, t: m(i, t), nnx.Intermediate)(
        model, batch['image'], batch['text'])
    scale = jnp.minimum(model.logit_scale(), layers.MAX_LOGIT_SCALE)
    loss = contrastive(image_emb, text_emb, scale, model.logit_bias(), config.model.head,
                       variant.cfg.label_smoothing, config.loss.chunk_size, config.loss.impl)
    moe_loss, moe_metrics = base.moe_aux(intermediates, config.loss)
    metrics = {'logit_scale': scale}
    if moe_metrics:  # an MoE model: the loss includes its auxiliary losses
      metrics.update(contrastive_loss=loss, **moe_metrics)
    return loss + moe_loss, (metrics, model_state)

  def train_flops(self, config, variant):
    return flops.align_train_flops(config.model, variant.batch_size)

  def activation_bytes(self, config, variant, sizes):
    """Both towers on one micro-batch, plus the contrastive loss's temporaries (vlp.losses)."""
    m = config.model
    batch = variant.batch_size // variant.accum_steps
    im = m.image
    seq = (variant.image_size // im.patch_size) ** 2 + 1
    total = tower_activation_bytes(config, [(im, seq), (m.text, m.text.context_length)], batch, sizes)
    return total + losses.temp_bytes(m.head, config.loss.impl, batch, sizes['data'] * sizes['fsdp'],
                                     m.embed_dim, config.loss.chunk_size)


RECIPE = Align()
__all__ = ['RECIPE', 'Align', 'contrastive', 'towers']
