"""The config schema: every key a config has, with its default and what it means.

Every config starts from `vlp.recipes.base_config(name)`: this module's common
keys plus the recipe's own sections, locked, so a typo in a config file or in
`--config.a.b=v` (vlp.core.config_files) is an error that names the key, not a
silent new field. What each key may hold is checked in one pass before
anything is built (vlp.validation). This module imports nothing else from vlp.
"""
import ml_collections

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')
SCHEDULES = ('interval', 'weighted')
REMAT_POLICIES = ('none', 'full', 'dots_saveable')
ATTENTION = ('xla', 'dot_product_attention', 'auto')


def moe_config() -> dict:
  """Mixture-of-Experts in a Transformer stack (vlp.models.moe); num_experts=0: dense.

  The MoE blocks are every `every`-th block, among the last `last` (0: all);
  IMP: expert choice, capacity factor 1.0, 16 experts in the last 6 blocks.
  """
  return dict(num_experts=0, every=2, last=0, router='expert_choice', k=1, capacity_factor=1.0,
              batch_priority=False)


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
      # 'xla': attention as einsums and a softmax; 'dot_product_attention': jax.nn.dot_product_attention
      # (cuDNN's fused kernel on a GPU where it applies); 'auto': the fused one on GPUs, 'xla' elsewhere
      attention='xla',
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
  # logical-axis rules of vlp.core.parallel, the batch over (data, fsdp).
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1)
  # (logical axis, mesh axis or axes or None) pairs overriding vlp.core.parallel.RULES, e.g.
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
  # XLA's persistent compilation cache: 'workdir' = WORKDIR/compile_cache, a path (gs:// too), '' off
  c.compile_cache = 'workdir'
  # Compiler flags ('--name=value') per platform, set before the backend starts (vlp.core.compiler_flags):
  # tpu's in LIBTPU_INIT_ARGS (libtpu alone reads them), gpu's or cpu's in XLA_FLAGS on such a run;
  # defaults='auto' adds vlp's measured defaults for the platform and mesh (on TPU with FSDP:
  # MaxText's all-gather and reduce-scatter flags), 'none' leaves them out
  c.compiler = dict(defaults='auto', tpu=(), gpu=(), cpu=())
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
      name='synthetic',  # a dataset of vlp.data.sources: 'synthetic', 'arrayrecord', 'webdataset' or 'tfds'
      # arrayrecord: files, directories or globs; webdataset: img2dataset tar shards
      # ('laion/{00000..00099}.tar'); several separated by commas. Unused for synthetic/tfds.
      train='',
      eval='',  # held-out image-text pairs for retrieval: ArrayRecord or tar shards ('' = none)
      tfds=dict(name='', data_dir='', train_split='train', eval_split='validation',
                image_key='image', caption_key='captions/text'),
      train_examples=100_000,  # synthetic: size of the train split
      eval_images=500,  # images in the retrieval eval (synthetic: one caption per language each)
      languages=('en', 'de', 'fr', 'es'),  # synthetic captions
      # 'builtin', a SentencePiece .model (`vlp data tokenizer`), or a BERT import's tokenizer.json
      tokenizer='builtin',
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


def eval_config(kind: str, **overrides) -> dict:
  """An evaluator entry for `config.evals`: the defaults of `kind` updated by overrides."""
  if kind not in EVAL_DEFAULTS:
    raise ConfigError(f'unknown evaluator kind {kind!r}; known: {", ".join(EVAL_DEFAULTS)}')
  unknown = set(overrides) - set(EVAL_DEFAULTS[kind])
  if unknown:
    raise ConfigError(f'evaluator {kind!r} has no key(s) {sorted(unknown)}; '
                      f'known: {sorted(EVAL_DEFAULTS[kind])}')
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
TASK_LOSSES = ('contrastive', 'classification')
VISION = ('image', 'video')


def task_config(**overrides) -> dict:
  """A task entry for `config.tasks`: the defaults updated by overrides."""
  unknown = set(overrides) - set(TASK_DEFAULTS)
  if unknown:
    raise ConfigError(f'a task has no key(s) {sorted(unknown)}; known: {sorted(TASK_DEFAULTS)}')
  return dict(TASK_DEFAULTS, **overrides)


class ConfigError(ValueError):
  """A bad config: the message names the key."""


def check(ok: bool, key: str, message: str):
  """Raises ConfigError naming `key` unless ok."""
  if not ok:
    raise ConfigError(f"config key '{key}': {message}")


def check_positive_ints(section, key: str, names=('width', 'depth', 'num_heads', 'mlp_dim')):
  """A Transformer stack's sizes: positive ints, width divisible by the heads."""
  for k in names:
    check(isinstance(section[k], int) and section[k] > 0, f'{key}.{k}',
          f'must be a positive int, got {section[k]!r}')
  if 'num_heads' in names:
    check(section.width % section.num_heads == 0, f'{key}.num_heads',
          f'width {section.width} is not divisible by {section.num_heads} heads')


def paths(value: str) -> list[str]:
  """A comma-separated config value as a list of paths."""
  return [p.strip() for p in value.split(',') if p.strip()]
