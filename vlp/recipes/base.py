"""The recipe protocol: everything vlp needs to know about one model family.

A recipe is one package (vlp/recipes/<name>/, or any module that calls
`vlp.recipes.register`) exposing a `Recipe` object. Shared code (the plan,
the trainer, evaluators, export, benchmarks) asks the recipe and never
compares model names. The methods, with what they are for:

  config_sections()      its own config keys (merged into vlp.config.base_config)
  validate(config)       checks of those keys (ConfigError naming the key)
  check_task(...)        which task entries (config.tasks) it can train
  default_tasks(config)  the task(s) when config.tasks is empty
  vision_tokens(...)     vision tokens per example (scales batches across resolutions)
  frames(config, task)   frames per clip of a video task
  build(model_cfg)       the Flax NNX model
  batch_spec(...)        the one batch schema: input pipeline, compiled step, random batch
  preprocess_options()   extra arguments of the input pipeline's example maker
  init_sources(config)   params to start from besides init.from (ALBEF: a BERT import)
  init_model_state(...)  state besides params and optimizer (momentum params, queues)
  loss(...)              (loss, (metrics, new model state)) of one variant's batch
  untouched_params(...)  top-level params a task's step leaves alone
  predict_fns(graphdef)  the functions evaluators call ('image', 'text', ...)
  export_encoders(...)   the encoders `vlp export` serialises
  train_flops(...)       analytic model FLOPs of one step (MFU)
  activation_bytes(...)  per-device activation estimate (the memory table)
"""
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vlp import config as config_lib
from vlp.config import ConfigError, check
from vlp.models import layers, moe as moe_lib, vit

DEFAULT_TASK = 'default'  # the task of a config without config.tasks


class Recipe:
  name = ''
  identity_keys: tuple[str, ...] = ()  # config keys besides `model` that a resume must keep
  modalities: tuple[str, ...] = ('image', 'text')  # what its encoders take (predict_fns' keys)
  eval_kinds: tuple[str, ...] = ('retrieval', 'zeroshot')  # the evaluator kinds it supports

  def config_sections(self) -> dict:
    raise NotImplementedError

  def validate(self, config):
    """Checks the recipe's own config keys."""

  def check_task(self, config, key, task):
    """Refuses a task entry this recipe cannot train: ConfigError naming `key(field)`, the
    config key of one of its fields."""

  def default_tasks(self, config) -> dict:
    """One task: config.data at config.batch_size (its input item is `data`, metrics unprefixed)."""
    task = config_lib.task_config(data='task', batch_size=config.batch_size, accum_steps=config.accum_steps,
                                  label_smoothing=config.loss.label_smoothing)
    return {DEFAULT_TASK: ml_collections.ConfigDict(task)}

  def vision_tokens(self, config, task, image_size: int) -> int:
    return (image_size // config.model.image.patch_size) ** 2

  def frames(self, config, task) -> int:
    """Frames per clip of a video task (0: no video)."""
    return 0

  def build(self, model_cfg, seed: int = 0) -> nnx.Module:
    raise NotImplementedError

  def batch_spec(self, config, variant) -> dict:
    """{key: (shape of one example, dtype)} of a variant's training batch."""
    size = variant.image_size
    return {'image': ((size, size, 3), jnp.uint8), 'text': ((config.model.text.context_length,), jnp.int32)}

  def preprocess_options(self, config) -> dict:
    return {}

  def num_classes(self, task) -> int:
    raise NotImplementedError(f'recipe {self.name!r} has no classification tasks')

  def random_batch(self, config, variant, rng: np.random.Generator) -> dict:
    """Random numpy inputs of the variant's global batch shapes (benchmarks, tests)."""
    batch = {}
    for k, s in variant.spec.items():
      if k == 'label':
        batch[k] = rng.integers(0, self.num_classes(variant.cfg), s.shape)
      elif s.dtype == np.uint8:  # pixels
        batch[k] = rng.integers(0, 256, s.shape)
      elif np.issubdtype(s.dtype, np.floating):
        batch[k] = rng.normal(size=s.shape)
      else:
        batch[k] = rng.integers(5, config.model.text.vocab_size, size=s.shape)
      batch[k] = batch[k].astype(s.dtype)
    return batch

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
  """A tower's Mixture-of-Experts section (vlp.config.moe_config)."""
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


def image_text_only(key, task, name: str):
  """Dual encoders train contrastive image-text tasks."""
  if tuple(task.modalities) != ('image', 'text') or task.loss != 'contrastive':
    raise ConfigError(f"config key '{key('modalities')}': {name} trains contrastive ('image', 'text') tasks, "
                      f'got {tuple(task.modalities)!r} with loss {task.loss!r}')


def moe_aux(intermediates, loss_cfg):
  """The weighted MoE auxiliary losses of a captured forward pass, and their metrics."""
  return moe_lib.aux_losses(intermediates, {'load_balance': loss_cfg.moe_load_balance,
                                            'router_z': loss_cfg.moe_router_z})

