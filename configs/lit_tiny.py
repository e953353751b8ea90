"""LiT (Zhai et al. 2022), tiny, on the built-in scenes: a trained image tower locked, the text
tower trained from scratch against it.

  vlp train --config=configs/align_tiny.py --workdir=workdirs/align_tiny
  vlp train --config=configs/lit_tiny.py --workdir=workdirs/lit_tiny --config.init.from=workdirs/align_tiny
init.from is any vlp workdir or `vlp export` directory whose image tower has align_tiny's
shapes; its image tower and projection are loaded (init.only) and get no update and no optimizer state
(optim.frozen). The step skips the image tower's backward pass.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location('align_tiny', os.path.join(os.path.dirname(__file__), 'align_tiny.py'))
align_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(align_tiny)


def get_config(arg=None):
  c = align_tiny.get_config(arg)
  image = ('image/.*', 'image_proj/.*')  # the ViT and its projection into the embedding space
  c.init.only = image  # from init.from; the text tower and the temperature start from scratch
  c.optim.frozen = image
  return c
