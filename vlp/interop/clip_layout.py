"""What open_clip's and transformers' CLIP share, in vlp's layout: the ViT's stem and the
dual encoder around the towers. Each converter maps its own names onto these."""
import numpy as np


def image_tower(conv, class_embedding, positions, ln_pre: tuple, encoder: dict, image_cfg) -> dict:
  """vlp's ViT params of CLIP's: conv [W, 3, p, p] -> patch_embed.kernel [(p p 3), W] (no bias);
  positions [1 + grid^2, W], the CLS position first: the class embedding plus its position
  (both constants added before ln_pre) is vlp's `cls`, the rest its grid."""
  width, p = image_cfg['width'], image_cfg['patch_size']
  grid = image_cfg['image_size'] // p
  return {'patch_embed': {'kernel': conv.transpose(2, 3, 1, 0).reshape(p * p * 3, width)},
          'pos_embed': positions[1:].reshape(grid, grid, width), 'cls': class_embedding + positions[0],
          'ln_pre': {'scale': ln_pre[0], 'bias': ln_pre[1]}, 'encoder': encoder}


def dual_encoder(image: dict, text: dict, image_proj, text_proj, log_scale) -> dict:
  """vlp's ALIGN params: projections as [in, out] kernels, the log temperature a scalar."""
  return {'image': image, 'text': text, 'image_proj': {'kernel': image_proj}, 'text_proj': {'kernel': text_proj},
          'log_scale': np.asarray(log_scale, np.float32).reshape(())}
