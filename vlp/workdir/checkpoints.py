"""A workdir's checkpoints: the Orbax manager of its checkpoints/ folder, and the params of one
step for the readers (`vlp eval`, `vlp export`, `init.from`)."""
import jax

from vlp import checkpoint, plan as plan_lib
from vlp.core import config as config_lib, parallel
from vlp.workdir import identity, layout


def manager(workdir: str, cfg, read_only: bool = False, data_items=('data',)) -> checkpoint.Checkpointer:
  """The checkpoints of `workdir` (config.checkpoint's cfg): saved into checkpoints/, a step that
  does not restore set aside into checkpoints_corrupt/."""
  return checkpoint.Checkpointer(layout.path(workdir, layout.CHECKPOINTS), cfg, read_only=read_only,
                                 data_items=data_items, set_aside_to=layout.path(workdir, layout.CORRUPT))


def restore_params(workdir: str, step=None, weights: str = 'params'):
  """(config, params, step) of a workdir's checkpoint: `step`, or the newest that restores (a newer
  damaged one is reported in one line and left alone); weights='ema' gives the moving average of
  the params instead. Only those are read, not the optimizer state."""
  config = identity.load_config(workdir)
  if weights == 'ema' and not config.get('ema_decay', 0.0) > 0:
    raise config_lib.ConfigError(f"config key 'ema_decay': {workdir} was trained without an EMA of the params "
                                 '(ema_decay=0); train with --config.ema_decay=0.999 or export --weights=params')
  plan = plan_lib.make(config, jax.device_count(), jax.process_count())
  abstract = plan.params(parallel.make_mesh(plan.sizes)).abstract
  ckpt = manager(workdir, config.checkpoint, read_only=True)
  wanted = 'ema_params' if weights == 'ema' else 'params'
  try:
    step, state = ckpt.newest_restorable({wanted: abstract}, step)
  finally:
    ckpt.close()
  if step is None:
    raise FileNotFoundError(f'{workdir} has no checkpoint that restores')
  return config, state[wanted], step
