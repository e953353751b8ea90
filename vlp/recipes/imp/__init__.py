"""IMP (Akbari et al. 2023): one modality-agnostic (Mixture-of-Experts) Transformer for
images, video and text, trained by alternating gradient descent over tasks.

Objectives, one per task:
  contrastive     softmax NCE between a vision modality and text, with the
                  pair's own learnt temperature (scale_image_text, scale_video_text);
  classification  cross-entropy over the class names put in prompts and
                  embedded by the text path, with its own temperature: the
                  trained classifier *is* zero-shot classification.
A task touches the encoder, the embedders and heads of its modalities (text
too, for classification) and its temperature; `untouched_params` names the
rest, which its steps leave alone (params and optimizer state).
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vlp import losses
from vlp.core import config as config_lib
from vlp.core.config import check
from vlp.data import sources, tokenizer as tokenizer_lib
from vlp.models import flops, imp as model_lib
from vlp.recipes import align, base


def class_names(data: str) -> list[str]:
  """The classes of a classification task's (labelled, built-in) data."""
  return list(sources.SOURCES[data].class_names)


def class_prompts(config, task):
  """int32 [classes * templates, L]: every class name in every template, class-major."""
  prompts = [t.format(name) for name in class_names(task.data) for t in task.templates]
  return tokenizer_lib.for_config(config).encode(prompts, config.model.text.context_length)


def vision_of(task) -> str:
  return next(m for m in task.modalities if m in config_lib.VISION)


class Imp(base.Recipe):
  name = 'imp'
  modalities = ('image', 'video', 'text')
  needs_tasks = True  # one model, many tasks: a config names them

  def config_sections(self):
    return {'model': dict(
        # the embedders' patch size and native resolution, the vocabulary and context length
        image=dict(image_size=64, patch_size=8),
        text=dict(vocab_size=1024, context_length=32),
        # the one Transformer every modality goes through; qk_layernorm normalises queries
        # and keys per head (IMP's MoE models use it)
        encoder=dict(width=256, depth=4, num_heads=4, mlp_dim=1024, moe=config_lib.moe_config(),
                     qk_layernorm=False),
        # clips of `frames` frames cut into tubelets of tubelet_size frames x patch_size^2 pixels
        video=dict(frames=8, tubelet_size=2),
        embed_dim=256,
        # vlp.models.layers.Arch: ALIGN's choices (exact GELU, eps 1e-5), and every matrix decays;
        # with imp_tiny's label smoothing off, all together: +24.9 / +20.9 image-text RSUM for dense
        # IMP / IMP-MoE at imp_tiny, video-text -7.0 / +23.2 (docs/results.md)
        arch=dict(init='xavier', gelu='erf', ln_eps=1e-5),
    ), 'optim': dict(no_decay=())}

  def validate(self, config, tasks=()):
    m = config.model
    config_lib.check_positive_ints(m.encoder, 'model.encoder')
    base.validate_moe(m.encoder.moe, 'model.encoder.moe', m.encoder.depth)
    base.validate_arch(m.arch)
    check(m.image.image_size % m.image.patch_size == 0, 'model.image.patch_size',
          f'image_size {m.image.image_size} is not divisible by patch {m.image.patch_size}')
    v = m.video
    check(v.tubelet_size >= 1 and v.frames >= v.tubelet_size and v.frames % v.tubelet_size == 0,
          'model.video.frames', f'{v.frames} frames do not split into tubelets of {v.tubelet_size}')
    for task in tasks:
      frames = task.cfg.frames or v.frames
      check(frames % v.tubelet_size == 0, task.key('frames'),
            f'{frames} frames do not split into tubelets of {v.tubelet_size}')

  def vision(self, config, task, image_size):
    """Images: their patches; clips: tubelets of tubelet_size frames x patch_size^2 pixels."""
    grid = (image_size // config.model.image.patch_size) ** 2
    if vision_of(task) != 'video':
      return 0, grid
    frames = task.frames or config.model.video.frames
    return frames, grid * frames // config.model.video.tubelet_size

  def build(self, model_cfg, seed=0):
    return model_lib.Model(model_cfg, rngs=nnx.Rngs(seed))

  def batch_spec(self, config, variant):
    t, size = variant.cfg, variant.image_size
    spec = {'image': ((size, size, 3), jnp.uint8)} if variant.vision == 'image' else \
        {'video': ((variant.frames, size, size, 3), jnp.uint8)}
    if 'text' in t.modalities:
      spec['text'] = ((config.model.text.context_length,), jnp.int32)
    if t.loss == 'classification':
      spec['label'] = ((), jnp.int32)
    return spec

  def loss(self, graphdef, params, model_state, batch, step, config, variant):
    """The loss of one task (variant) on its batch."""
    t, v = variant.cfg, variant.vision
    model = nnx.merge(graphdef, params)
    # DropToken: a key per (seed, variant, step), the same on every device
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 1000 + variant.index), step)
    if t.loss == 'classification':
      prompts = class_prompts(config, t)  # traced once: a constant of the compiled step
      other = lambda m: model_lib.class_embeddings(m, prompts, len(class_names(t.data)))
    else:
      other = lambda m: m.encode_text(batch['text'])
    forward = lambda m: (m.encode(v, batch[v], t.drop_token, key), other(m))
    (vision_emb, other_emb), intermediates = nnx.capture(forward, nnx.Intermediate)(model)
    metrics = {}
    if t.loss == 'classification':
      scale = model.logit_scale(f'{v}_class')
      logits = scale * vision_emb @ other_emb.T
      labels = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]), t.label_smoothing)
      loss = jnp.mean(optax.softmax_cross_entropy(logits, labels))
      metrics['accuracy'] = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    else:
      scale = model.logit_scale(f'{v}_text')
      loss = align.contrastive(vision_emb, other_emb, scale, None, 'softmax', t.label_smoothing,
                               config.loss.chunk_size, config.loss.impl)
      metrics.update(align.in_batch_accuracy(vision_emb, other_emb))  # vision -> text and back
    moe_loss, moe_metrics = base.moe_aux(intermediates, config.loss)
    metrics.update(logit_scale=scale, **moe_metrics)
    if moe_metrics:
      metrics['task_loss'] = loss
    return loss + moe_loss, (metrics, model_state)

  def untouched_params(self, variant, params):
    v = variant.vision
    scale = f'scale_{v}_text' if variant.cfg.loss == 'contrastive' else f'scale_{v}_class'
    touched = {'encoder', f'{v}_embed', f'{v}_head', 'text_embed', 'text_head', scale}
    return frozenset(params) - touched

  def predict_fns(self, graphdef):
    fns = super().predict_fns(graphdef)
    fns['video'] = lambda p, x: nnx.merge(graphdef, p).encode_video(x)
    return fns

  def export_encoders(self, model_cfg):
    size = model_cfg.image.image_size
    return {**super().export_encoders(model_cfg),
            'video': ('encode_video', (model_cfg.video.frames, size, size, 3), jnp.float32)}

  def train_flops(self, config, variant):
    """3 x the forward pass: the vision embedder on every patch or tubelet; the shared encoder
    on the tokens DropToken keeps, and the vision head; then either the text path on the
    captions and the B x B logits of each micro-batch (contrastive), or the text path on
    every class prompt (once per micro-batch) and the B x classes logits (classification)."""
    m, t = config.model, variant.cfg
    enc, e = m.encoder, m.embed_dim
    stack = lambda seq: flops.encoder_forward_flops(seq, enc.width, enc.depth, enc.mlp_dim, enc.moe)
    b, k = variant.batch_size, variant.accum_steps
    tokens = self.vision(config, t, variant.image_size)[1]
    pixels_per_token = 3 * m.image.patch_size ** 2 * (m.video.tubelet_size if variant.vision == 'video' else 1)
    kept = max(1, round(tokens * (1.0 - t.drop_token)))
    vision = flops.matmul_flops(tokens, enc.width, pixels_per_token) + stack(kept) + flops.matmul_flops(1, e, enc.width)
    text = stack(m.text.context_length) + flops.matmul_flops(1, e, enc.width)
    if t.loss == 'contrastive':
      forward = b * (vision + text) + k * flops.contrastive_logits_flops(b // k, e)
    else:
      classes = len(class_names(t.data))
      forward = b * vision + k * classes * len(t.templates) * text + flops.matmul_flops(b, classes, e)
    return 3.0 * forward

  def activation_bytes(self, config, variant, sizes):
    """The encoder on the vision tokens after DropToken, then on the captions (and the
    contrastive loss, vlp.losses) or on every class prompt, on every device."""
    m, t = config.model, variant.cfg
    batch = variant.batch_size // variant.accum_steps
    vision = max(1, round(self.vision(config, t, variant.image_size)[1] * (1 - t.drop_token)))
    total = align.tower_activation_bytes(config, [(m.encoder, vision)], batch, sizes)
    shards = sizes['data'] * sizes['fsdp']
    if t.loss == 'contrastive':
      total += align.tower_activation_bytes(config, [(m.encoder, m.text.context_length)], batch, sizes)
      return total + losses.temp_bytes('softmax', config.loss.impl, batch, shards, m.embed_dim, config.loss.chunk_size)
    # every class prompt on every device
    prompts = len(class_names(t.data)) * len(t.templates)
    return total + align.tower_activation_bytes(config, [(m.encoder, m.text.context_length)], prompts * shards, sizes)


RECIPE = Imp()
