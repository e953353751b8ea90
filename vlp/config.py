"""Configs: the schema, python files with `get_config(arg)`, dotted overrides, type checks.

Every config starts from `vlp.recipes.base_config(name)`: this module's common
keys plus the recipe's own section, locked, so a typo in a config file or in
`--config.a.b=v` is an error that names the key, not a silent new field.
`validate_common` checks the keys every recipe shares; the recipe checks its
own, and the checks that need the mesh run where the plan is built
(vlp.plan). This module imports nothing else from vlp.
"""
import ast
import difflib
import importlib.util
import math
import os

import ml_collections

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
SCHEDULES = ('interval', 'weighted')
REMAT_POLICIES = ('none', 'full', 'dots_saveable')


def moe_config() -> dict:
  """Mixture-of-Experts in a Transformer stack (vlp.models.moe); num_experts=0: dense.

  The MoE blocks are every `every`-th block, among the last `last` (0: all);
  IMP: expert choice, capacity factor 1.0, 16 experts in the last 6 blocks.
  """
  return dict(num_experts=0, every=2, last=0, router='expert_choice', k=1, capacity_factor=1.0, batch_priority=False)


def base_config(name: str = 'align', sections: dict | None = None) -> ml_collections.ConfigDict:
  """The common keys, with `sections` (a recipe's own: vlp.recipes.base_config) merged in:
  `sections['model']` extends config.model, `sections['evals']` replaces the default
  evaluators, one named like a common section (optim) updates its keys, any other is new."""
  sections = dict(sections or {})
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 128  # global, over all processes
  c.model = dict(
      name=name,  # the recipe (vlp.recipes): what the rest of the model section means
      dtype='float32',  # compute dtype of matmuls and activations ('float32' or 'bfloat16')
      # master params and optimizer state; 'float32' keeps bf16 training exact in the update
      param_dtype='float32',
      remat='none',  # rematerialise Transformer blocks: 'none', 'full' or 'dots_saveable'
      scan_layers=False,  # each stack of like blocks as one lax.scan: compiled once whatever the depth
      **sections.pop('model', {}),
  )
  # impl (vlp.losses): 'gather' (each device's rows x the gathered text; chunk_size > 0: in
  # blocks of that many rows) or 'ring' (text blocks pass round the devices: [rows, rows]).
  # moe_*: weights of the MoE auxiliary losses (Switch load balancing, ST-MoE router z-loss)
  c.loss = dict(label_smoothing=0.0, impl='gather', chunk_size=0, moe_load_balance=0.01, moe_router_z=0.001)
  # Gradient accumulation: the step averages the gradients (and losses) of this many
  # micro-batches; micro-batch j holds examples j, j+k, j+2k, ... of the global batch.
  # A contrastive loss only contrasts within a micro-batch: the result is the mean of
  # micro-batch losses, not the loss of the whole batch.
  c.accum_steps = 1
  c.data = data_section()
  c.optim = dict(
      name='adamw',  # 'adamw' or 'lamb'
      lr=1e-3, end_lr_frac=0.0, warmup_steps=100,
      schedule='cosine',  # 'cosine', 'linear' or 'constant' after warm-up
      weight_decay=0.05, b1=0.9, b2=0.98, eps=1e-6,
      clip_norm=1.0,  # global-norm clipping; 0 disables
      no_decay=('pos_embed',),  # param names without weight decay besides vectors/biases (ALIGN: ())
      frozen=(), lr_mult=(),  # LiT (vlp.train.optim): regexes of params never updated; ((regex, factor), ...)
  )
  c.init = {'from': '', 'only': ()}  # start from a vlp workdir's or export's params (vlp.train.init_from)
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
  c.evals = sections.pop('evals', None) or dict(retrieval=eval_config('retrieval'))
  # Alternating gradient descent over tasks: one task per step, each with its own data,
  # loss, batch size and resolutions. Add with `c.tasks.NAME = task_config(...)`; none:
  # the recipe's default task (config.data at config.batch_size).
  c.tasks = {}
  # 'interval': round-robin rounds, a task joining every `interval`-th round (IMP's code);
  # 'weighted': one task per step drawn with probability ~ `weight` (IMP's paper).
  c.agd = dict(schedule='interval')
  c.compile_cache = 'workdir'  # XLA's persistent cache: 'workdir' = WORKDIR/compile_cache, a path (gs:// too), '' off
  c.nonfinite = dict(guard=True, max_consecutive=5, spike_window=100, spike_zscore=6.0)  # vlp.train.guard
  c.ema_decay = 0.0  # > 0 keeps an exponential moving average of the params (`vlp export --weights=ema`)
  c.profile = dict(steps=())  # (A, B): trace steps A+1..B into WORKDIR/profile (vlp.train.profile); () off
  c.checkpoint = dict(
      every=500, keep=2, async_save=True,
      keep_every=0,  # > 0: also keep every checkpoint whose step is a multiple of this, forever
      save_timeout_s=900,  # a save not committed in this time (storage gone) stops the run in one line
      restore_data=True,  # False: the train state alone, the input afresh (e.g. on another process count)
  )
  for key, section in sections.items():
    c[key] = {**c[key], **section} if key in c else section
  c.lock()
  c.evals.unlock()  # a config may add evaluators; their keys are checked by validate
  c.tasks.unlock()  # likewise tasks
  return c


def data_section() -> dict:
  """config.data: where the examples come from and how they are made."""
  return dict(
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
      tokenizer='builtin',  # or a SentencePiece .model (`vlp data tokenizer`), or a BERT import's tokenizer.json
      crop_scale=(0.5, 1.0),  # random-resized crop: area fraction kept (encoded images only)
      flip=False,  # random left-right flip; off by default: captions name left and right
      max_pixels=64_000_000,  # larger images are skipped as decompression bombs
      cycle_length=4, shuffle_window=1000,  # webdataset: shards read at once, example mixing
      num_workers=1,  # Grain worker processes per host
      prefetch=4,
  )


# Every key an evaluator entry may have, with its default (hold_images=False: re-decoded at each eval). data:
#   retrieval: 'task' (the held-out split of config.data), 'synthetic', 'karpathy'
#              (path = dataset_coco.json / dataset_flickr30k.json, image_dir), 'tfds'
#   zeroshot:  'synthetic' (built-in labels), 'folder' (path: one subfolder per class), 'tfds'
_EVAL_COMMON = dict(data='task', path='', image_dir='', split='test', num_images=0,
                    tfds_name='', tfds_data_dir='', image_key='image', batch_size=256, hold_images=True)
EVAL_DEFAULTS = {
    'retrieval': dict(_EVAL_COMMON, kind='retrieval', caption_key='captions/text', ks=(1, 5, 10),
                      by_language=True),
    'zeroshot': dict(_EVAL_COMMON, kind='zeroshot', data='synthetic', label_key='label',
                     class_names=(), templates=()),
}
# retrieval whose top rerank_k candidates are re-ranked by an image-text matching head (ALBEF)
EVAL_DEFAULTS['itm_rerank'] = dict(EVAL_DEFAULTS['retrieval'], kind='itm_rerank', rerank_k=16)
_RETRIEVAL_DATA = ('task', 'synthetic', 'synthetic_video', 'karpathy', 'tfds')
EVAL_DATA = {'retrieval': _RETRIEVAL_DATA, 'itm_rerank': _RETRIEVAL_DATA,
             'zeroshot': ('synthetic', 'synthetic_video', 'folder', 'tfds')}


def eval_config(kind: str, **overrides) -> dict:
  """An evaluator entry for `config.evals`: the defaults of `kind` updated by overrides."""
  if kind not in EVAL_DEFAULTS:
    raise ConfigError(f'unknown evaluator kind {kind!r}; known: {", ".join(EVAL_DEFAULTS)}')
  unknown = set(overrides) - set(EVAL_DEFAULTS[kind])
  if unknown:
    raise ConfigError(f'evaluator {kind!r} has no key(s) {sorted(unknown)}; known: {sorted(EVAL_DEFAULTS[kind])}')
  return dict(EVAL_DEFAULTS[kind], **overrides)


# Every key of a task (config.tasks.NAME), with its default; a recipe says which values it trains.
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
  """A task entry for `config.tasks`: the defaults updated by overrides."""
  unknown = set(overrides) - set(TASK_DEFAULTS)
  if unknown:
    raise ConfigError(f'a task has no key(s) {sorted(unknown)}; known: {sorted(TASK_DEFAULTS)}')
  return dict(TASK_DEFAULTS, **overrides)


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of a config file given by path."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  spec = importlib.util.spec_from_file_location(f'vlp_config_{os.path.splitext(os.path.basename(path))[0]}', path)
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
    raise ConfigError(f"config key '{key}' expects {type(current).__name__}, got {raw!r}")
  return value


def check(ok: bool, key: str, message: str):
  """Raises ConfigError naming `key` unless ok."""
  if not ok:
    raise ConfigError(f"config key '{key}': {message}")


def check_positive_ints(section, key: str, names=('width', 'depth', 'num_heads', 'mlp_dim')):
  """A Transformer stack's sizes: positive ints, width divisible by the heads."""
  for k in names:
    check(isinstance(section[k], int) and section[k] > 0, f'{key}.{k}', f'must be a positive int, got {section[k]!r}')
  if 'num_heads' in names:
    check(section.width % section.num_heads == 0, f'{key}.num_heads',
          f'width {section.width} is not divisible by {section.num_heads} heads')


def validate_common(config):
  """Checks the keys every recipe shares; raises ConfigError naming the key."""
  m = config.model
  check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', f'{m.dtype!r} not in float32/bfloat16')
  check(m.param_dtype in ('float32', 'bfloat16'), 'model.param_dtype', f'{m.param_dtype!r} not in float32/bfloat16')
  check(m.remat in REMAT_POLICIES, 'model.remat', f'{m.remat!r} not in {"/".join(REMAT_POLICIES)}')
  check(0.0 <= config.loss.label_smoothing < 1.0, 'loss.label_smoothing', 'must be in [0, 1)')
  check(config.loss.chunk_size >= 0, 'loss.chunk_size', 'must be >= 0')
  o = config.optim
  check(o.name in ('adamw', 'lamb'), 'optim.name', f'{o.name!r} not in adamw/lamb')
  check(o.schedule in ('cosine', 'linear', 'constant'), 'optim.schedule', f'{o.schedule!r} not in cosine/linear/constant')
  check(o.lr > 0, 'optim.lr', 'must be > 0')
  check(all(isinstance(n, str) for n in o.no_decay), 'optim.no_decay', f'must be param names, got {o.no_decay!r}')
  check(o.warmup_steps >= 0, 'optim.warmup_steps', 'must be >= 0')
  check(config.total_steps > 0, 'total_steps', 'must be > 0')
  check(isinstance(config.accum_steps, int) and config.accum_steps >= 1, 'accum_steps', 'must be >= 1')
  for rule in config.mesh_rules:
    check(len(rule) == 2, 'mesh_rules', f'{rule!r} is not a (logical axis, mesh axis) pair')
    name, axis = rule
    for a in axis if isinstance(axis, (tuple, list)) else (axis,):
      check(a is None or a in MESH_AXES, f'mesh_rules.{name}', f'{a!r} is not a mesh axis {MESH_AXES}')
  _validate_data(config.data)
  check(0.0 <= config.ema_decay < 1.0, 'ema_decay', 'must be in [0, 1)')
  s = config.profile.steps
  check(not s or (len(s) == 2 and all(type(x) is int for x in s) and 0 <= s[0] < s[1]), 'profile.steps',
        f'must be () (off) or (A, B): ints, 0 <= A < B; got {s!r}')
  _validate_evals(config)
  c = config.checkpoint
  for key, value, low in (('checkpoint.every', c.every, 1), ('checkpoint.keep', c.keep, 1), ('log_every', config.log_every, 1),
                          ('checkpoint.keep_every', c.keep_every, 0), ('eval_every', config.eval_every, 0),
                          ('checkpoint.save_timeout_s', c.save_timeout_s, 1)):
    check(value >= low, key, f'must be >= {low}')
  check(config.agd.schedule in SCHEDULES, 'agd.schedule', f'{config.agd.schedule!r} not in {"/".join(SCHEDULES)}')
  check(not config.tasks or config.accum_steps == 1, 'accum_steps',
         'with config.tasks each task accumulates on its own: set tasks.<name>.accum_steps')
  for name, t in config.tasks.items():
    validate_task(f'tasks.{name}', t)


def validate_task(key, t):
  """The recipe-independent checks of one task entry."""
  check(isinstance(t, ml_collections.ConfigDict), key, 'build tasks with vlp.config.task_config(...)')
  for k in t:
    close = difflib.get_close_matches(k, list(TASK_DEFAULTS), n=1)
    check(k in TASK_DEFAULTS, f'{key}.{k}', 'unknown key' + (f"; did you mean '{key}.{close[0]}'?" if close else ''))
  for k in TASK_DEFAULTS:
    check(k in t, f'{key}.{k}', 'missing (build tasks with vlp.config.task_config)')
  check(t.data in TASK_DATA, f'{key}.data', f'{t.data!r} not in {"/".join(TASK_DATA)}')
  check(t.loss in TASK_LOSSES, f'{key}.loss', f'{t.loss!r} not in {"/".join(TASK_LOSSES)}')
  mods = tuple(t.modalities)
  want = 'a (vision, text) pair' if t.loss == 'contrastive' else 'one vision modality'
  ok = (len(mods) == 2 and mods[0] in VISION and mods[1] == 'text') if t.loss == 'contrastive' else \
      (len(mods) == 1 and mods[0] in VISION)
  check(ok, f'{key}.modalities', f'{mods!r}: a {t.loss} task takes {want}, vision in {"/".join(VISION)}')
  data_vision = 'video' if t.data == 'synthetic_video' else 'image'
  check(mods[0] == data_vision, f'{key}.data', f'{t.data!r} holds {data_vision}s, the task wants {mods[0]}')
  check(t.loss != 'classification' or t.data != 'task', f'{key}.data',
         "classification needs labels: the built-in 'synthetic' or 'synthetic_video' data")
  for size in t.resolutions:
    check(isinstance(size, int) and size > 0, f'{key}.resolutions', f'{size!r} is not a positive int')
  check(t.weight > 0, f'{key}.weight', 'must be > 0')
  check(isinstance(t.interval, int) and t.interval >= 1, f'{key}.interval', 'must be an int >= 1')
  check(isinstance(t.accum_steps, int) and t.accum_steps >= 1, f'{key}.accum_steps', 'must be an int >= 1')
  check(isinstance(t.batch_size, int) and t.batch_size >= 1, f'{key}.batch_size', 'must be an int >= 1')
  check(0.0 <= t.drop_token < 1.0, f'{key}.drop_token', 'must be in [0, 1)')
  check(0.0 <= t.label_smoothing < 1.0, f'{key}.label_smoothing', 'must be in [0, 1)')
  check(len(t.templates) > 0 and all('{}' in p for p in t.templates), f'{key}.templates',
         "needs templates, each with a '{}' for the class name")


DATASETS = ('synthetic', 'arrayrecord', 'webdataset', 'tfds')


def _validate_data(d):
  check(d.name in DATASETS, 'data.name', f'unknown dataset {d.name!r}; known: {", ".join(DATASETS)}')
  if d.name == 'synthetic':
    check(set(d.languages) <= {'en', 'de', 'fr', 'es'} and len(d.languages) > 0,
           'data.languages', f'{d.languages!r}: choose from en, de, fr, es')
  elif d.name == 'tfds':
    check(bool(d.tfds.name), 'data.tfds.name', "data.name='tfds' needs a TFDS dataset name")
  else:
    check(bool(d.train), 'data.train', f"data.name={d.name!r} needs the training shards' paths")
  lo, hi = d.crop_scale
  check(0 < lo <= hi <= 1, 'data.crop_scale', f'{tuple(d.crop_scale)} must be 0 < min <= max <= 1')
  check(d.max_pixels > 0, 'data.max_pixels', 'must be > 0')
  check(d.cycle_length >= 1 and d.shuffle_window >= 1, 'data.cycle_length', 'cycle_length and shuffle_window must be >= 1')
  check(d.num_workers >= 0 and d.prefetch >= 1, 'data.num_workers', 'num_workers must be >= 0 and prefetch >= 1')


def _validate_evals(config):
  for name, e in config.evals.items():
    key = f'evals.{name}'
    check(isinstance(e, ml_collections.ConfigDict) and e.get('kind') in EVAL_DEFAULTS, f'{key}.kind',
           f'{e.get("kind") if isinstance(e, ml_collections.ConfigDict) else e!r}: '
           f'known kinds: {", ".join(EVAL_DEFAULTS)} (use vlp.config.eval_config)')
    allowed = EVAL_DEFAULTS[e.kind]
    for k in e:
      close = difflib.get_close_matches(k, list(allowed), n=1)
      check(k in allowed, f'{key}.{k}', 'unknown key' + (f"; did you mean '{key}.{close[0]}'?" if close else ''))
    for k in allowed:
      check(k in e, f'{key}.{k}', 'missing (build entries with vlp.config.eval_config)')
    check(e.data in EVAL_DATA[e.kind], f'{key}.data', f'{e.data!r} not in {"/".join(EVAL_DATA[e.kind])}')
    check(e.data != 'karpathy' or (e.path and e.image_dir), f'{key}.path',
           "data='karpathy' needs path (the Karpathy JSON) and image_dir")
    check(e.data != 'folder' or bool(e.path), f'{key}.path', "data='folder' needs path (one subfolder per class)")
    check(e.data != 'tfds' or bool(e.tfds_name), f'{key}.tfds_name', "data='tfds' needs a TFDS dataset name")
    check(e.num_images >= 0 and e.batch_size > 0, f'{key}.num_images', 'num_images >= 0, batch_size > 0')
    check(e.kind != 'itm_rerank' or e.rerank_k >= 1, f'{key}.rerank_k', 'must be >= 1')
    if e.kind == 'zeroshot':
      check(all('{}' in t for t in e.templates), f'{key}.templates', "every template needs a '{}' for the class name")


def paths(value: str) -> list[str]:
  """A comma-separated config value as a list of paths."""
  return [p.strip() for p in value.split(',') if p.strip()]


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Resolves the one -1 axis size so the product equals the device count."""
  unknown = [a for a in MESH_AXES if config.mesh[a] == -1]
  check(len(unknown) <= 1, 'mesh', f'at most one axis may be -1, got {unknown}')
  for a in MESH_AXES:
    check(config.mesh[a] == -1 or (isinstance(config.mesh[a], int) and config.mesh[a] >= 1), f'mesh.{a}', 'must be -1 or >= 1')
  sizes = {a: config.mesh[a] for a in MESH_AXES}
  known = math.prod(v for v in sizes.values() if v != -1)
  if unknown:
    check(num_devices % known == 0, f'mesh.{unknown[0]}',
           f'{num_devices} devices are not divisible by the other axes ({known})')
    sizes[unknown[0]] = num_devices // known
  check(math.prod(sizes.values()) == num_devices, 'mesh',
         f'axis sizes {sizes} multiply to {math.prod(sizes.values())}, not the {num_devices} devices')
  return sizes
