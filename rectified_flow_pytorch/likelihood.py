"""Exact likelihoods of a flow by the instantaneous change of variables (Chen et al. 2018, Thm. 1).

Along dx/dt = v(x, t), d log p_t(x_t) / dt = -div v(x_t, t). With data at t = 1 and the Gaussian source at t = 0:
    log p_1(x_1) = log p_0(x_0) + int_1^0 div v(x_t, t) dt,
computed by integrating the augmented state (x, int div v) backwards from t = 1.
"""
import math

import torch

from rectified_flow_pytorch import solvers


def gaussian_log_density(z, std=1.0):
  """log N(z; 0, std^2 I) of each sample, (B, ...) -> (B,)."""
  d = z[0].numel()
  return -0.5 * d * math.log(2 * math.pi * std ** 2) - z.flatten(1).square().sum(1) / (2 * std ** 2)


def exact_divergence(velocity, x, t):
  """div v = sum_i dv_i / dx_i by one backward pass per dimension (for small inputs). Returns (v, div)."""
  with torch.enable_grad():
    x = x.detach().requires_grad_(True)
    v = velocity(x, t)
    flat_v = v.flatten(1)
    divergence = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat_v.shape[1]):
      grad = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=i + 1 < flat_v.shape[1])[0]
      divergence = divergence + grad.flatten(1)[:, i]
  return v.detach(), divergence.detach()


def hutchinson_divergence(velocity, x, t, probe):
  """Unbiased div v ~ eps^T (dv/dx) eps with a fixed probe eps (Hutchinson 1989; FFJORD). Returns (v, div)."""
  with torch.enable_grad():
    x = x.detach().requires_grad_(True)
    v = velocity(x, t)
    vjp = torch.autograd.grad((v * probe).sum(), x)[0]
  return v.detach(), (vjp * probe).flatten(1).sum(1).detach()


def log_likelihood(velocity, x1, *, t_data=1.0, t_noise=0.0, noise_std=1.0, divergence='hutchinson',
                   probe='rademacher', solver='rk45', steps=100, rtol=1e-5, atol=1e-5, generator=None):
  """log p(x1) in nats per sample, (B,), and the NFE, for data ``x1`` under the flow v.

  ``divergence='exact'`` costs one backward pass per data dimension; 'hutchinson' one per evaluation, with a
  Rademacher or Gaussian ``probe`` drawn once per call (fixed along the trajectory, as FFJORD does).
  """
  if divergence not in ('exact', 'hutchinson'):
    raise ValueError(f"Unknown divergence {divergence!r}; valid: 'exact', 'hutchinson'")
  shape = x1.shape
  d = x1[0].numel()
  if divergence == 'hutchinson':
    eps = torch.randn(shape, generator=generator, dtype=x1.dtype, device='cpu').to(x1.device)
    if probe == 'rademacher':
      eps = eps.sign()
    elif probe != 'gaussian':
      raise ValueError(f"Unknown probe {probe!r}; valid: 'rademacher', 'gaussian'")

  def augmented(state, t):
    x = state[:, :d].reshape(shape)
    if divergence == 'exact':
      v, div = exact_divergence(velocity, x, t)
    else:
      v, div = hutchinson_divergence(velocity, x, t, eps)
    return torch.cat([v.flatten(1), div[:, None]], dim=1)

  start = torch.cat([x1.flatten(1), torch.zeros(shape[0], 1, dtype=x1.dtype, device=x1.device)], dim=1)
  end, nfe = solvers.solve(solver, augmented, start, t0=t_data, t1=t_noise, steps=steps, rtol=rtol, atol=atol)
  x0 = end[:, :d].reshape(shape)
  return gaussian_log_density(x0, noise_std) + end[:, d], nfe


def bits_per_dim(log_likelihood_nats, data_dim, offset_bits=0.0):
  """-log p / (d ln 2) + offset: ``offset_bits`` converts from model space to 8-bit pixel space, e.g. 7 for data
  scaled from [0, 256) to [-1, 1) (a factor 2/256 = 2^-7 per dimension), 8 for [0, 1)."""
  return -log_likelihood_nats / (data_dim * math.log(2)) + offset_bits
