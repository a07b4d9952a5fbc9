"""Config -> library adapters for the samplers, and sample grids."""
import os

import torch
from torchvision.utils import save_image

from rectified_flow_pytorch import solvers


def get_sampling_fn(config, shape):
  """``sample(flow) -> (samples in model space, nfe)`` for the sampler named by ``sampling.use_ode_sampler``."""
  name = config.sampling.use_ode_sampler
  if name not in solvers.SOLVERS:
    raise ValueError(f'Unknown sampling.use_ode_sampler {name!r}; valid samplers: {sorted(solvers.SOLVERS)}')
  tol = config.sampling.ode_tol

  def sample(flow, noise=None):
    if noise is None:
      noise = flow.sample_noise(shape, device=flow._device())
    samples = flow.sample(noise=noise, solver=name, steps=config.sampling.sample_N, rtol=tol, atol=tol)
    return samples, flow.last_sample_nfe

  return sample


def save_sample_grid(images, path, nrow=None):
  """Writes (B, C, H, W) images in [0, 1] as one PNG grid, atomically (temporary file, then rename)."""
  nrow = nrow or max(1, int(images.shape[0] ** 0.5))
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp.png'
  save_image(images.clamp(0.0, 1.0).float().cpu(), tmp, nrow=nrow, padding=2)
  os.replace(tmp, path)
  return path
