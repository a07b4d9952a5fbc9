"""Config -> library adapters for the samplers, and sample grids."""
import os

import torch
from torchvision.utils import save_image

from rectified_flow_pytorch import solvers


def get_sampling_fn(config, shape):
  """``sample(flow) -> (samples in model space, nfe)`` for the sampler named by ``sampling.use_ode_sampler``."""
  name = config.sampling.use_ode_sampler
  if name not in solvers.SOLVERS:
    raise ValueError(f'Unknown sampling.use_ode_sampler {name!r}; valid samplers: {list(solvers.SOLVERS)}')
  eps, steps, tol = config.training.time_eps, config.sampling.sample_N, config.sampling.ode_tol

  def sample(flow, noise=None):
    """Integrates ``flow.velocity`` from t = eps to 1 as the published samplers do."""
    if noise is None:
      noise = flow.sample_noise(shape, device=flow._device())
    if name == 'euler':  # The published grid: t_i = eps + i (1 - eps) / N with steps of 1/N.
      return solvers.euler(flow.velocity, noise, steps=steps, t0=eps, t1=1.0, step_size=1.0 / steps)
    return solvers.solve(name, flow.velocity, noise, t0=eps, t1=1.0, steps=steps, rtol=tol, atol=tol)

  return sample


def save_sample_grid(images, path, nrow=None):
  """Writes (B, C, H, W) images in [0, 1] as one PNG grid, atomically (temporary file, then rename)."""
  nrow = nrow or max(1, int(images.shape[0] ** 0.5))
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp.png'
  save_image(images.clamp(0.0, 1.0).float().cpu(), tmp, nrow=nrow, padding=2)
  os.replace(tmp, path)
  return path
