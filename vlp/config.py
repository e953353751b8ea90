"""Configs: python files with `get_config(arg)`, dotted overrides, validation.

Every config starts from `base_config()`, which is locked: a typo in a config
file or in `--config.a.b=v` is an error that names the key, not a silent new
field. `validate` runs before anything is compiled.
"""
import ast
import difflib
import importlib.util
import os

import ml_collections

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
MODELS = ('align', 'albef', 'imp')
SCHEDULES = ('interval', 'weighted')
REMAT_POLICIES = ('none', 'full', 'dots_saveable')


def moe_config() -> dict:
  """Mixture-of-Experts in a Transformer stack (vlp.models.moe); num_experts=0: dense.

  The MoE blocks are every `every`-th block, among the last `last` (0: all);
  IMP: expert choice, capacity factor 1.0, 16 experts in the last 6 blocks.
  """
  return dict(num_experts=0, every=2, last=0, router='expert_choice', k=1, capacity_factor=1.0,
              batch_priority=False)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128  # global, over all processes
  c.model = dict(
      name='align',
      image=dict(image_size=64, patch_size=8, width=256, depth=4, num_heads=4, mlp_dim=1024,
                 pool='cls', moe=moe_config()),
      text=dict(vocab_size=1024, context_length=32, width=256, depth=4, num_heads=4, mlp_dim=1024,
                moe=moe_config()),
      embed_dim=256,
      head='softmax',  # 'softmax' (ALIGN/CLIP) or 'sigmoid' (SigLIP)
      dtype='float32',  # compute dtype of matmuls and activations ('float32' or 'bfloat16')
      # master params and optimizer state; 'float32' keeps bf16 training exact in the update
      param_dtype='float32',
      remat='none',  # rematerialise Transformer blocks: 'none', 'full' or 'dots_saveable'
      # ALBEF: text layers below it encode text alone, layers from it on (up to
      # text.depth) add cross-attention to the image tokens. Unused by ALIGN.
      fusion_layer=2,
      # IMP: the one Transformer that every modality goes through (model.image gives the
      # patch size and native resolution, model.text the vocabulary and context length);
      # qk_layernorm normalises queries and keys per head (IMP's MoE models use it).
      encoder=dict(width=256, depth=4, num_heads=4, mlp_dim=1024, moe=moe_config(), qk_layernorm=False),
      # IMP's video embedder: clips of `frames` frames cut into tubelets of tubelet_size
      # frames x patch_size^2 pixels (model.image.patch_size).
      video=dict(frames=8, tubelet_size=2),
  )
  # ALBEF training (Li et al. 2021, configs/Pretrain.yaml); unused by ALIGN.
  c.albef = dict(
      momentum=0.995,  # EMA factor of the momentum model
      queue_size=65536,  # momentum features kept per modality; a multiple of batch_size
      alpha=0.4,  # distillation weight after the ramp
      alpha_warmup_steps=1000,  # linear ramp of alpha from 0 (ALBEF: the first epoch)
      mlm_prob=0.15,  # share of non-special tokens masked (80% [MASK], 10% random, 10% kept)
      rerank_k=16,  # retrieval eval: ITC candidates re-ranked by the ITM score
  )
  # chunk_size > 0: the loss walks the global batch in blocks of that many rows, so
  # at most chunk_size x batch logits exist at once (also in the backward pass).
  # moe_*: weights of the MoE auxiliary losses (Switch load balancing, ST-MoE router z-loss)
  c.loss = dict(label_smoothing=0.0, chunk_size=0, moe_load_balance=0.01, moe_router_z=0.001)
  # Gradient accumulation: the step averages the gradients (and losses) of this many
  # micro-batches; micro-batch j holds examples j, j+k, j+2k, ... of the global batch.
  # A contrastive loss only contrasts within a micro-batch: the result is the mean of
  # micro-batch losses, not the loss of the whole batch.
  c.accum_steps = 1
  c.data = dict(
      name='synthetic',  # 'synthetic', 'arrayrecord', 'webdataset' or 'tfds'
      # arrayrecord: files, directories or globs; webdataset: img2dataset tar shards
      # ('laion/{00000..00099}.tar'); several separated by commas. Unused for synthetic/tfds.
      train='',
      eval='',  # held-out image-text pairs for retrieval: ArrayRecord or tar shards ('' = none)
      tfds=dict(name='', data_dir='', train_split='train', eval_split='validation',
                image_key='image', caption_key='captions/text'),
      train_examples=100_000,  # synthetic: size of the train split
      eval_images=500,  # images in the retrieval eval (synthetic: one caption per language each)
      languages=('en', 'de', 'fr', 'es'),  # synthetic captions
      tokenizer='builtin',  # or a path to a SentencePiece .model (`vlp data tokenizer`)
      crop_scale=(0.5, 1.0),  # random-resized crop: area fraction kept (encoded images only)
      flip=False,  # random left-right flip; off by default: captions name left and right
      max_pixels=64_000_000,  # larger images are skipped as decompression bombs
      cycle_length=4, shuffle_window=1000,  # webdataset: shards read at once, example mixing
      num_workers=1,  # Grain worker processes per host
      prefetch=4,
  )
  c.optim = dict(
      name='adamw',  # 'adamw' or 'lamb'
      lr=1e-3, end_lr_frac=0.0, warmup_steps=100,
      schedule='cosine',  # 'cosine', 'linear' or 'constant' after warm-up
      weight_decay=0.05, b1=0.9, b2=0.98, eps=1e-6,
      clip_norm=1.0,  # global-norm clipping; 0 disables
  )
  # Mesh axis sizes; -1 takes the devices left over. Params are sharded by the
  # logical-axis rules of vlp.parallel, the batch over (data, fsdp).
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  # (logical axis, mesh axis or axes or None) pairs overriding vlp.parallel.RULES, e.g.
  # --config.mesh_rules="(('embed', None),)" keeps weights whole (no FSDP).
  c.mesh_rules = ()
  c.log_every = 25
  c.eval_every = 500  # 0 disables periodic eval; eval still runs at the end
  # Evaluators run every eval_every steps and by `vlp eval`; metrics are named
  # '<entry name>/<metric>'. Add more with `c.evals.NAME = eval_config(kind, ...)`.
  c.evals = dict(retrieval=eval_config('retrieval'))
  # IMP trains by alternating gradient descent over tasks: one task per step, each with
  # its own data, loss, batch size and resolutions. Add with `c.tasks.NAME = task_config(...)`.
  c.tasks = {}
  # 'interval': round-robin rounds, a task joining every `interval`-th round (IMP's code);
  # 'weighted': one task per step drawn with probability ~ `weight` (IMP's paper).
  c.agd = dict(schedule='interval')
  c.compile_cache = 'workdir'  # XLA's persistent cache: 'workdir' = WORKDIR/compile_cache, a path (gs:// too), '' off
  c.ema_decay = 0.0  # > 0 keeps an exponential moving average of the params (`vlp export --weights=ema`)
  c.checkpoint = dict(
      every=500, keep=2, async_save=True,
      keep_every=0,  # > 0: also keep every checkpoint whose step is a multiple of this, forever
      # False: restore only the train state and start the input pipeline afresh, e.g. on
      # another process count, whose per-process input positions cannot be taken over
      restore_data=True,
  )
  c.lock()
  c.evals.unlock()  # a config may add evaluators; their keys are checked by validate
  c.tasks.unlock()  # likewise tasks
  return c


# Every key an evaluator entry may have, with its default. data:
#   retrieval: 'task' (the held-out split of config.data), 'synthetic', 'karpathy'
#              (path = dataset_coco.json / dataset_flickr30k.json, image_dir), 'tfds'
#   zeroshot:  'synthetic' (built-in labels), 'folder' (path: one subfolder per class), 'tfds'
_EVAL_COMMON = dict(data='task', path='', image_dir='', split='test', num_images=0,
                    tfds_name='', tfds_data_dir='', image_key='image', batch_size=256)
EVAL_DEFAULTS = {
    'retrieval': dict(_EVAL_COMMON, kind='retrieval', caption_key='captions/text', ks=(1, 5, 10),
                      by_language=True),
    'zeroshot': dict(_EVAL_COMMON, kind='zeroshot', data='synthetic', label_key='label',
                     class_names=(), templates=()),
}
EVAL_DATA = {'retrieval': ('task', 'synthetic', 'synthetic_video', 'karpathy', 'tfds'),
             'zeroshot': ('synthetic', 'synthetic_video', 'folder', 'tfds')}


def eval_config(kind: str, **overrides) -> dict:
  """An evaluator entry for `config.evals`: the defaults of `kind` updated by overrides."""
  if kind not in EVAL_DEFAULTS:
    raise ConfigError(f'unknown evaluator kind {kind!r}; known: {", ".join(EVAL_DEFAULTS)}')
  unknown = set(overrides) - set(EVAL_DEFAULTS[kind])
  if unknown:
    raise ConfigError(f'evaluator {kind!r} has no key(s) {sorted(unknown)}; known: {sorted(EVAL_DEFAULTS[kind])}')
  return dict(EVAL_DEFAULTS[kind], **overrides)


# Every key of an IMP task (config.tasks.NAME), with its default.
TASK_DEFAULTS = dict(
    # 'synthetic': the built-in scenes (image, caption, label); 'synthetic_video': the built-in
    # clips of moving objects (video, caption, label); 'task': config.data's image-text pairs
    data='synthetic',
    modalities=('image', 'text'),  # contrastive: (vision, 'text'); classification: (vision,)
    # 'contrastive': softmax NCE of the pair, its own learnt temperature; 'classification':
    # cross-entropy over the class names embedded by the text path (so the head is zero-shot too)
    loss='contrastive',
    batch_size=128,  # global, at the first resolution
    # image sizes in pixels, () = (model.image.image_size,). Several: one compiled step each,
    # used in turn, the batch scaled so that vision tokens per step stay the same
    resolutions=(),
    frames=0,  # frames per clip (video tasks); 0 = model.video.frames
    weight=1.0,  # share of steps under agd.schedule='weighted'
    interval=1,  # agd.schedule='interval': joins every interval-th round
    accum_steps=1,  # micro-batches per step (lax.scan), for a batch that does not fit
    drop_token=0.0,  # share of vision tokens dropped at random in training (DropToken; IMP: 0.75 for video)
    label_smoothing=0.0,
    templates=('a {}',),  # classification: prompts the class names are put in
)
TASK_DATA = ('synthetic', 'synthetic_video', 'task')
TASK_LOSSES = ('contrastive', 'classification')
VISION = ('image', 'video')


def task_config(**overrides) -> dict:
  """A task entry for `config.tasks` (IMP): the defaults updated by overrides."""
  unknown = set(overrides) - set(TASK_DEFAULTS)
  if unknown:
    raise ConfigError(f'a task has no key(s) {sorted(unknown)}; known: {sorted(TASK_DEFAULTS)}')
  return dict(TASK_DEFAULTS, **overrides)


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of a config file given by path."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(
      f'vlp_config_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(arg)
  except AttributeError as e:  # assignment to a key the locked base lacks
    raise ConfigError(f'{path}: {e}') from None


class ConfigError(ValueError):
  """A bad config: the message names the key."""


def _all_keys(config, prefix=''):
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _all_keys(v, prefix + k + '.')
    else:
      yield prefix + k


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
  """Applies `a.b=v` strings; `v` is parsed with the type of the current value."""
  for item in overrides:
    key, sep, raw = item.partition('=')
    if not sep:
      raise ConfigError(f'override {item!r} is not of the form key=value')
    parent, _, leaf = key.rpartition('.')
    node = config
    for part in parent.split('.') if parent else []:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      close = difflib.get_close_matches(key, list(_all_keys(config)), n=1)
      hint = f"; did you mean '{close[0]}'?" if close else ''
      raise ConfigError(f"unknown config key '{key}'{hint}")
    node[leaf] = _parse_like(node[leaf], raw, key)
  return config


def _parse_like(current, raw: str, key: str):
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config key '{key}': cannot parse {raw!r}") from None
  if isinstance(current, bool) and not isinstance(value, bool):
    raise ConfigError(f"config key '{key}' expects true/false (True/False), got {raw!r}")
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(
        f"config key '{key}' expects {type(current).__name__}, got {raw!r}")
  return value


def _validate_moe(moe, key: str, depth: int):
  from vlp.models import moe as moe_lib
  if not moe.num_experts:
    return
  _check(isinstance(moe.num_experts, int) and moe.num_experts > 1, f'{key}.num_experts',
         f'must be 0 (dense) or an int > 1, got {moe.num_experts!r}')
  _check(moe.router in moe_lib.ROUTERS, f'{key}.router', f'{moe.router!r} not in {"/".join(moe_lib.ROUTERS)}')
  _check(moe.router != 'top_k' or 1 <= moe.k <= moe.num_experts, f'{key}.k',
         f'top-k routing needs 1 <= k <= num_experts, got {moe.k}')
  _check(moe.capacity_factor > 0, f'{key}.capacity_factor', 'must be > 0')
  _check(moe.every >= 1 and 0 <= moe.last <= depth, f'{key}.every',
         f'every must be >= 1 and last in [0, depth={depth}]')
  from vlp.models.layers import moe_blocks
  _check(any(moe_blocks(depth, moe)), f'{key}.every',
         f'every {moe.every}-th of the last {moe.last or depth} blocks is no block at all: no MoE')
  _check(not moe.batch_priority or moe.router == 'top_k', f'{key}.batch_priority',
         'batch-priority routing applies to the top_k router only')


def _check(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f"config key '{key}': {message}")


def validate(config, num_devices: int, process_count: int = 1):
  """Checks the config before anything is built; raises ConfigError naming the key."""
  m = config.model
  _check(m.name in MODELS, 'model.name', f"unknown model {m.name!r}; known: {', '.join(MODELS)}")
  _check(m.head in ('softmax', 'sigmoid'), 'model.head', f"{m.head!r} not in softmax/sigmoid")
  _check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', f'{m.dtype!r} not in float32/bfloat16')
  for tower in ('image', 'text'):
    t = m[tower]
    for k in ('width', 'depth', 'num_heads', 'mlp_dim'):
      _check(isinstance(t[k], int) and t[k] > 0, f'model.{tower}.{k}', f'must be a positive int, got {t[k]!r}')
    _check(t.width % t.num_heads == 0, f'model.{tower}.num_heads',
           f'width {t.width} is not divisible by {t.num_heads} heads')
    _validate_moe(t.moe, f'model.{tower}.moe', t.depth)
  im = m.image
  _check(im.image_size % im.patch_size == 0, 'model.image.patch_size',
         f'image_size {im.image_size} is not divisible by patch {im.patch_size}')
  _check(im.pool in ('cls', 'gap'), 'model.image.pool', f'{im.pool!r} not in cls/gap')
  _check(m.text.context_length >= 3, 'model.text.context_length', 'needs room for CLS, a token and SEP')
  _check(0.0 <= config.loss.label_smoothing < 1.0, 'loss.label_smoothing', 'must be in [0, 1)')
  o = config.optim
  _check(o.name in ('adamw', 'lamb'), 'optim.name', f'{o.name!r} not in adamw/lamb')
  _check(o.schedule in ('cosine', 'linear', 'constant'), 'optim.schedule',
         f'{o.schedule!r} not in cosine/linear/constant')
  _check(o.lr > 0, 'optim.lr', 'must be > 0')
  _check(o.warmup_steps >= 0, 'optim.warmup_steps', 'must be >= 0')
  _check(config.total_steps > 0, 'total_steps', 'must be > 0')
  _check(m.param_dtype in ('float32', 'bfloat16'), 'model.param_dtype',
         f'{m.param_dtype!r} not in float32/bfloat16')
  _check(m.remat in REMAT_POLICIES, 'model.remat', f'{m.remat!r} not in {"/".join(REMAT_POLICIES)}')
  _check(isinstance(config.accum_steps, int) and config.accum_steps >= 1, 'accum_steps', 'must be >= 1')
  _check(config.loss.chunk_size >= 0, 'loss.chunk_size', 'must be >= 0')
  from vlp import parallel  # the rules table lives with the mesh code
  for rule in config.mesh_rules:
    _check(len(rule) == 2, 'mesh_rules', f'{rule!r} is not a (logical axis, mesh axis) pair')
    name, axis = rule
    _check(name in parallel.RULES, f'mesh_rules.{name}',
           f'unknown logical axis; known: {", ".join(parallel.RULES)}')
    for a in axis if isinstance(axis, (tuple, list)) else (axis,):
      _check(a is None or a in MESH_AXES, f'mesh_rules.{name}', f'{a!r} is not a mesh axis {MESH_AXES}')
  _validate_data(config.data)
  _check(0.0 <= config.ema_decay < 1.0, 'ema_decay', 'must be in [0, 1)')
  _validate_evals(config)
  if m.name == 'albef':
    _validate_albef(config)
  sizes = mesh_shape(config, num_devices)
  c = config.checkpoint
  _check(c.keep >= 1, 'checkpoint.keep', 'must be >= 1')
  _check(c.keep_every >= 0, 'checkpoint.keep_every', 'must be >= 0')
  if m.name == 'imp':
    _validate_imp(config, sizes, process_count)
    return sizes
  _check(not config.tasks, 'tasks', "alternating-gradient tasks are for model.name='imp'; "
         f'{m.name!r} trains on config.data with config.batch_size')
  batch_shards = sizes['data'] * sizes['fsdp']
  _check(config.batch_size % batch_shards == 0, 'batch_size',
         f'{config.batch_size} is not divisible by the batch axes data*fsdp = '
         f'{sizes["data"]}*{sizes["fsdp"]} = {batch_shards}')
  _check(config.batch_size % process_count == 0, 'batch_size',
         f'{config.batch_size} is not divisible by {process_count} processes')
  # every device holds the same number of examples of each micro-batch
  _check(config.batch_size % (config.accum_steps * batch_shards) == 0, 'accum_steps',
         f'batch {config.batch_size} does not split into {config.accum_steps} micro-batches '
         f'over data*fsdp = {batch_shards} devices')
  micro = config.batch_size // config.accum_steps
  _check(config.loss.chunk_size == 0 or micro % config.loss.chunk_size == 0, 'loss.chunk_size',
         f'{config.loss.chunk_size} does not divide the (micro-)batch of {micro}')
  return sizes


def _validate_imp(config, sizes, process_count):
  m = config.model
  e = m.encoder
  for k in ('width', 'depth', 'num_heads', 'mlp_dim'):
    _check(isinstance(e[k], int) and e[k] > 0, f'model.encoder.{k}', f'must be a positive int, got {e[k]!r}')
  _check(e.width % e.num_heads == 0, 'model.encoder.num_heads', f'width {e.width} is not divisible by {e.num_heads} heads')
  _validate_moe(e.moe, 'model.encoder.moe', e.depth)
  v = m.video
  _check(v.tubelet_size >= 1 and v.frames >= v.tubelet_size and v.frames % v.tubelet_size == 0,
         'model.video.frames', f'{v.frames} frames do not split into tubelets of {v.tubelet_size}')
  _check(config.agd.schedule in SCHEDULES, 'agd.schedule', f'{config.agd.schedule!r} not in {"/".join(SCHEDULES)}')
  _check(config.accum_steps == 1, 'accum_steps', 'IMP accumulates per task: set tasks.<name>.accum_steps')
  _check(bool(config.tasks), 'tasks', "model.name='imp' trains tasks: add some with "
         'c.tasks.NAME = vlp.config.task_config(...)')
  for name, t in config.tasks.items():
    _validate_task(config, f'tasks.{name}', t)
  from vlp.train import agd  # the batch of every (task, resolution), rounded for the mesh
  for variant in agd.variants(config, sizes, process_count):
    micro = variant.batch_size // variant.accum_steps
    _check(variant.cfg.loss != 'contrastive' or not config.loss.chunk_size or micro % config.loss.chunk_size == 0,
           'loss.chunk_size', f'{config.loss.chunk_size} does not divide the micro-batch {micro} of {variant.name}')


def _validate_task(config, key, t):
  _check(isinstance(t, ml_collections.ConfigDict), key, 'build tasks with vlp.config.task_config(...)')
  for k in t:
    close = difflib.get_close_matches(k, list(TASK_DEFAULTS), n=1)
    _check(k in TASK_DEFAULTS, f'{key}.{k}', 'unknown key' + (f"; did you mean '{key}.{close[0]}'?" if close else ''))
  for k in TASK_DEFAULTS:
    _check(k in t, f'{key}.{k}', 'missing (build tasks with vlp.config.task_config)')
  _check(t.data in TASK_DATA, f'{key}.data', f'{t.data!r} not in {"/".join(TASK_DATA)}')
  _check(t.loss in TASK_LOSSES, f'{key}.loss', f'{t.loss!r} not in {"/".join(TASK_LOSSES)}')
  mods = tuple(t.modalities)
  want = 'a (vision, text) pair' if t.loss == 'contrastive' else 'one vision modality'
  ok = (len(mods) == 2 and mods[0] in VISION and mods[1] == 'text') if t.loss == 'contrastive' else \
      (len(mods) == 1 and mods[0] in VISION)
  _check(ok, f'{key}.modalities', f'{mods!r}: a {t.loss} task takes {want}, vision in {"/".join(VISION)}')
  vision = mods[0]
  data_vision = 'video' if t.data == 'synthetic_video' else 'image'
  _check(vision == data_vision, f'{key}.data', f'{t.data!r} holds {data_vision}s, the task wants {vision}')
  _check(t.loss != 'classification' or t.data != 'task', f'{key}.data',
         "classification needs labels: the built-in 'synthetic' or 'synthetic_video' data")
  patch = config.model.image.patch_size
  for size in t.resolutions:
    _check(isinstance(size, int) and size > 0 and size % patch == 0, f'{key}.resolutions',
           f'{size!r} is not a positive multiple of the patch size {patch}')
  frames = t.frames or config.model.video.frames
  _check(frames % config.model.video.tubelet_size == 0, f'{key}.frames',
         f'{frames} frames do not split into tubelets of {config.model.video.tubelet_size}')
  _check(t.weight > 0, f'{key}.weight', 'must be > 0')
  _check(isinstance(t.interval, int) and t.interval >= 1, f'{key}.interval', 'must be an int >= 1')
  _check(isinstance(t.accum_steps, int) and t.accum_steps >= 1, f'{key}.accum_steps', 'must be an int >= 1')
  _check(isinstance(t.batch_size, int) and t.batch_size >= 1, f'{key}.batch_size', 'must be an int >= 1')
  _check(0.0 <= t.drop_token < 1.0, f'{key}.drop_token', 'must be in [0, 1)')
  _check(0.0 <= t.label_smoothing < 1.0, f'{key}.label_smoothing', 'must be in [0, 1)')
  _check(len(t.templates) > 0 and all('{}' in p for p in t.templates), f'{key}.templates',
         "needs templates, each with a '{}' for the class name")


def _validate_albef(config):
  m, a = config.model, config.albef
  _check(isinstance(m.fusion_layer, int) and 0 <= m.fusion_layer < m.text.depth, 'model.fusion_layer',
         f'{m.fusion_layer!r} must be in [0, text.depth = {m.text.depth}): at least one fusion layer')
  _check(config.batch_size >= 2, 'batch_size', 'ALBEF draws in-batch hard negatives: needs >= 2')
  _check(a.queue_size > 0 and a.queue_size % config.batch_size == 0, 'albef.queue_size',
         f'{a.queue_size} is not a positive multiple of batch_size {config.batch_size} '
         '(each step enqueues one global batch)')
  _check(0.0 <= a.momentum < 1.0, 'albef.momentum', 'must be in [0, 1)')
  _check(0.0 <= a.alpha <= 1.0, 'albef.alpha', 'must be in [0, 1]')
  _check(a.alpha_warmup_steps >= 0, 'albef.alpha_warmup_steps', 'must be >= 0')
  _check(0.0 < a.mlm_prob < 1.0, 'albef.mlm_prob', 'must be in (0, 1)')
  _check(a.rerank_k >= 1, 'albef.rerank_k', 'must be >= 1')
  # the momentum model and the queues move once per step, not per micro-batch
  _check(config.accum_steps == 1, 'accum_steps', 'ALBEF updates momentum and queues per step: must be 1')
  _check(config.loss.chunk_size == 0, 'loss.chunk_size', 'ALIGN only; ALBEF contrasts against its queues')


DATASETS = ('synthetic', 'arrayrecord', 'webdataset', 'tfds')


def _validate_data(d):
  _check(d.name in DATASETS, 'data.name', f'unknown dataset {d.name!r}; known: {", ".join(DATASETS)}')
  if d.name == 'synthetic':
    _check(set(d.languages) <= {'en', 'de', 'fr', 'es'} and len(d.languages) > 0,
           'data.languages', f'{d.languages!r}: choose from en, de, fr, es')
  elif d.name == 'tfds':
    _check(bool(d.tfds.name), 'data.tfds.name', "data.name='tfds' needs a TFDS dataset name")
  else:
    _check(bool(d.train), 'data.train', f"data.name={d.name!r} needs the training shards' paths")
  lo, hi = d.crop_scale
  _check(0 < lo <= hi <= 1, 'data.crop_scale', f'{tuple(d.crop_scale)} must be 0 < min <= max <= 1')
  _check(d.max_pixels > 0, 'data.max_pixels', 'must be > 0')
  _check(d.cycle_length >= 1 and d.shuffle_window >= 1, 'data.cycle_length',
         'cycle_length and shuffle_window must be >= 1')
  _check(d.num_workers >= 0 and d.prefetch >= 1, 'data.num_workers',
         'num_workers must be >= 0 and prefetch >= 1')


def _validate_evals(config):
  for name, e in config.evals.items():
    key = f'evals.{name}'
    _check(isinstance(e, ml_collections.ConfigDict) and e.get('kind') in EVAL_DEFAULTS, f'{key}.kind',
           f'{e.get("kind") if isinstance(e, ml_collections.ConfigDict) else e!r}: '
           f'known kinds: {", ".join(EVAL_DEFAULTS)} (use vlp.config.eval_config)')
    allowed = EVAL_DEFAULTS[e.kind]
    for k in e:
      close = difflib.get_close_matches(k, list(allowed), n=1)
      _check(k in allowed, f'{key}.{k}', 'unknown key' + (f"; did you mean '{key}.{close[0]}'?" if close else ''))
    for k in allowed:
      _check(k in e, f'{key}.{k}', 'missing (build entries with vlp.config.eval_config)')
    _check(e.data in EVAL_DATA[e.kind], f'{key}.data',
           f'{e.data!r} not in {"/".join(EVAL_DATA[e.kind])}')
    _check(e.data != 'karpathy' or (e.path and e.image_dir), f'{key}.path',
           "data='karpathy' needs path (the Karpathy JSON) and image_dir")
    _check(e.data != 'folder' or bool(e.path), f'{key}.path', "data='folder' needs path (one subfolder per class)")
    _check(e.data != 'tfds' or bool(e.tfds_name), f'{key}.tfds_name', "data='tfds' needs a TFDS dataset name")
    _check(e.data != 'synthetic_video' or config.model.name == 'imp', f'{key}.data',
           "'synthetic_video' evaluates a video encoder: model.name='imp'")
    _check(e.num_images >= 0 and e.batch_size > 0, f'{key}.num_images', 'num_images >= 0, batch_size > 0')
    if e.kind == 'zeroshot':
      _check(all('{}' in t for t in e.templates), f'{key}.templates', "every template needs a '{}' for the class name")


def paths(value: str) -> list[str]:
  """A comma-separated config value as a list of paths."""
  return [p.strip() for p in value.split(',') if p.strip()]


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Resolves the one -1 axis size so the product equals the device count."""
  unknown = [a for a in MESH_AXES if config.mesh[a] == -1]
  _check(len(unknown) <= 1, 'mesh', f'at most one axis may be -1, got {unknown}')
  known = 1
  for a in MESH_AXES:
    if config.mesh[a] != -1:
      _check(isinstance(config.mesh[a], int) and config.mesh[a] >= 1, f'mesh.{a}', 'must be -1 or >= 1')
      known *= config.mesh[a]
  sizes = {a: config.mesh[a] for a in MESH_AXES}
  if unknown:
    _check(num_devices % known == 0, f'mesh.{unknown[0]}',
           f'{num_devices} devices are not divisible by the other axes ({known})')
    sizes[unknown[0]] = num_devices // known
  _check(_prod(sizes.values()) == num_devices, 'mesh',
         f'axis sizes {sizes} multiply to {_prod(sizes.values())}, not the {num_devices} devices')
  return sizes


def _prod(xs):
  p = 1
  for x in xs:
    p *= x
  return p
