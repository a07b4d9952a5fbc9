"""Evaluation metrics. The straightness of a flow (Liu et al. 2022, Sec. 2.2) is here; FID/IS/KID follow."""
import torch

from rectified_flow_pytorch import flow as flow_math


@torch.no_grad()
def straightness(velocity, x0, *, steps=100, eps=0.0):
  """S(Z) = E_t ||(Z1 - Z0) - v(Z_t, t)||^2 (mean over pixels) along Euler trajectories from x0.

  Zero for a perfectly straight flow. ``velocity(x, t)`` takes a (B,) time in [0, 1]. Returns (B,).
  """
  dt = 1.0 / steps
  z = x0
  velocities = []
  for i in range(steps):
    t = torch.full((x0.shape[0],), eps + i / steps * (1.0 - eps), device=x0.device, dtype=x0.dtype)
    v = velocity(z, t)
    velocities.append(v)
    z = z + v * dt
  displacement = z - x0
  return torch.stack([flow_math.per_sample_squared_error(v, displacement) for v in velocities]).mean(0)
