"""The recipe protocol: everything vlp needs to know about one model family.

A recipe is one package (vlp/recipes/<name>/, or any module that calls
`vlp.recipes.register`) exposing a `Recipe` object. Shared code (the validation,
the plan, the trainer, evaluators, export, benchmarks) asks the recipe and never
compares model names or looks for a model's keys. The door, with what each is for:

  config_sections()          its own config keys (merged into vlp.core.config.base_config)
  validate(config, tasks)    checks of those keys and of every task it is to train
                             (vlp.validation.Task: the entry and its config keys)
  vision(config, task, size) (frames per clip, vision tokens per example) of a task at a
                             resolution: the plan scales batches across resolutions by tokens
  build(model_cfg)           the Flax NNX model
  batch_spec(...)            the one batch schema: input pipeline, compiled step, random batch
  example_transform(...)     what its model needs of an example besides pixels, caption and
                             label (ALBEF: the MLM inputs), made in the input pipeline
  init_sources(config)       params to start from besides init.from (ALBEF: a BERT import)
  init_model_state(...)      state besides params and optimizer (momentum params, queues)
  loss(...)                  (loss, (metrics, new model state)) of one variant's batch
  untouched_params(...)      top-level params a task's step leaves alone
  predict_fns(graphdef)      the functions evaluators call ('image', 'text', ...)
  export_encoders(...)       the encoders `vlp export` serialises
  train_flops(...)           analytic model FLOPs of one step (MFU), from vlp.models.flops
  activation_bytes(...)      per-device activation estimate (the memory table)

and what it declares, checked in one place (vlp.validation):

  modalities, eval_kinds     what its encoders take; the evaluator kinds it supports
  identity_keys              config keys besides `model` that a resume must keep
  needs_tasks                no default task: a config must name config.tasks (IMP)
  accumulates                whether a step can accumulate gradients over micro-batches
                             (False for ALBEF: its momentum model and queues move once a step)
"""
import jax.numpy as jnp
from flax import nnx

from vlp.core import config as config_lib
from vlp.core.config import ConfigError, check
from vlp.models import layers, moe as moe_lib, vit


class Recipe:
  name = ''
  modalities: tuple[str, ...] = ('image', 'text')  # what its encoders take (predict_fns' keys)
  eval_kinds: tuple[str, ...] = ('retrieval', 'zeroshot')  # the evaluator kinds it supports
  identity_keys: tuple[str, ...] = ()  # config keys besides `model` that a resume must keep
  needs_tasks = False  # True: no default task, a config names config.tasks
  accumulates = True  # a step may average gradients over micro-batches (accum_steps > 1)

  def config_sections(self) -> dict:
    raise NotImplementedError

  def validate(self, config, tasks=()):
    """Checks the recipe's own config keys, and refuses a task (vlp.validation.Task) it cannot
    train: ConfigError naming the key (task.key(field) for a task's field)."""

  def vision(self, config, task, image_size: int) -> tuple[int, int]:
    """(frames per clip, 0 for images; vision tokens per example) of a task at a resolution."""
    return 0, (image_size // config.model.image.patch_size) ** 2

  def build(self, model_cfg, seed: int = 0) -> nnx.Module:
    raise NotImplementedError

  def batch_spec(self, config, variant) -> dict:
    """{key: (shape of one example, dtype)} of a variant's training batch."""
    size = variant.image_size
    return {'image': ((size, size, 3), jnp.uint8), 'text': ((config.model.text.context_length,), jnp.int32)}

  def example_transform(self, config, variant, tokenizer):
    """None, or f(example, rng) -> example adding the keys of the batch spec that the input pipeline
    does not make (pixels, 'text', 'label'), with the example's own random generator; a picklable
    object (Grain's workers). tokenizer: the run's (its special ids), or None for vlp's own."""
    return None

  def init_sources(self, config) -> list:
    """[(config key, source, convert)]: sources a fresh run takes params from besides init.from
    (vlp.train.init_from); convert(name, array) maps a source's param ('/'-joined name) to this
    model's (name, array), or to None for a param not taken."""
    return []

  def init_model_state(self, config, params) -> dict:
    return {}

  def loss(self, graphdef, params, model_state, batch, step, config, variant):
    raise NotImplementedError

  def untouched_params(self, variant, params) -> frozenset:
    return frozenset()

  def predict_fns(self, graphdef) -> dict:
    """f(params, inputs) -> L2-normalised embeddings, for 'image', 'text' (and 'video')."""
    model = lambda p: nnx.merge(graphdef, p)
    return {'image': lambda p, x: model(p).encode_image(x), 'text': lambda p, t: model(p).encode_text(t)}

  def export_encoders(self, model_cfg) -> dict:
    """{kind: (model method, shape of one input, dtype)} of the encoders `vlp export` writes."""
    size = model_cfg.image.image_size
    return {'image': ('encode_image', (size, size, 3), jnp.float32),
            'text': ('encode_text', (model_cfg.text.context_length,), jnp.int32)}

  def train_flops(self, config, variant) -> float:
    raise NotImplementedError(f'recipe {self.name!r} has no analytic FLOPs')

  def activation_bytes(self, config, variant, sizes) -> float | None:
    return None  # no estimate: the memory table leaves the row out


def validate_moe(moe, key: str, depth: int):
  """A tower's Mixture-of-Experts section (vlp.core.config.moe_config)."""
  if not moe.num_experts:
    return
  check(isinstance(moe.num_experts, int) and moe.num_experts > 1, f'{key}.num_experts',
        f'must be 0 (dense) or an int > 1, got {moe.num_experts!r}')
  check(moe.router in moe_lib.ROUTERS, f'{key}.router', f'{moe.router!r} not in {"/".join(moe_lib.ROUTERS)}')
  check(moe.router != 'top_k' or 1 <= moe.k <= moe.num_experts, f'{key}.k',
        f'top-k routing needs 1 <= k <= num_experts, got {moe.k}')
  check(moe.capacity_factor > 0, f'{key}.capacity_factor', 'must be > 0')
  check(moe.every >= 1 and 0 <= moe.last <= depth, f'{key}.every',
        f'every must be >= 1 and last in [0, depth={depth}]')
  check(any(layers.moe_blocks(depth, moe)), f'{key}.every',
        f'every {moe.every}-th of the last {moe.last or depth} blocks is no block at all: no MoE')
  check(not moe.batch_priority or moe.router == 'top_k', f'{key}.batch_priority',
        'batch-priority routing applies to the top_k router only')


def validate_towers(config, towers=('image', 'text')):
  """The image and text towers of a dual encoder (ALIGN, ALBEF)."""
  m = config.model
  for tower in towers:
    config_lib.check_positive_ints(m[tower], f'model.{tower}')
    validate_moe(m[tower].moe, f'model.{tower}.moe', m[tower].depth)
  im = m.image
  check(im.image_size % im.patch_size == 0, 'model.image.patch_size',
        f'image_size {im.image_size} is not divisible by patch {im.patch_size}')
  check(im.pool in vit.POOLS, 'model.image.pool', f"{im.pool!r} not in {'/'.join(vit.POOLS)}")
  check(im.pool != 'cls' or im.get('cls_token', True), 'model.image.pool',
        "'cls' needs the CLS token (model.image.cls_token=True)")
  for key in ('ln_pre', 'patch_bias'):
    check(isinstance(im.get(key, False), bool), f'model.image.{key}', f'must be True or False, got {im[key]!r}')
  check(m.text.context_length >= 3, 'model.text.context_length', 'needs room for CLS, a token and SEP')


def validate_arch(arch):
  """config.model.arch (vlp.models.layers.Arch)."""
  for key, choices in layers.ARCH_CHOICES.items():
    check(arch[key] in choices, f'model.arch.{key}', f"{arch[key]!r} not in {'/'.join(choices)}")
  check(isinstance(arch.ln_eps, float) and 0 < arch.ln_eps < 1, 'model.arch.ln_eps',
        f'must be a float in (0, 1), got {arch.ln_eps!r}')


def image_text_only(task, name: str):
  """Dual encoders train contrastive image-text tasks (task: a vlp.validation.Task)."""
  t = task.cfg
  if tuple(t.modalities) != ('image', 'text') or t.loss != 'contrastive':
    raise ConfigError(f"config key '{task.key('modalities')}': {name} trains contrastive ('image', 'text') tasks, "
                      f'got {tuple(t.modalities)!r} with loss {t.loss!r}')


def moe_aux(intermediates, loss_cfg):
  """The weighted MoE auxiliary losses of a captured forward pass, and their metrics."""
  return moe_lib.aux_losses(intermediates, {'load_balance': loss_cfg.moe_load_balance,
                                            'router_z': loss_cfg.moe_router_z})

