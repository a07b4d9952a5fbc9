"""The rectified-flow math (Liu, Gong, Liu 2022, "Flow Straight and Fast").

Time runs from t=0 (noise, X0) to t=1 (data, X1). The linear interpolation
    X_t = t X1 + (1 - t) X0                         (Eq. (1) of Liu et al. 2022)
has the velocity dX_t/dt = X1 - X0, which the network v(X_t, t) regresses.
"""
import torch


def append_dims(t, ndim):
  """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions in all, for broadcasting against a batch."""
  return t.reshape(t.shape[0], *([1] * (ndim - 1)))


def sample_uniform_times(batch_size, *, eps=1e-3, device=None, dtype=torch.float32, generator=None):
  """t ~ U[eps, 1], (B,); the published models use eps = 1e-3."""
  u = torch.rand(batch_size, device=device, dtype=dtype, generator=generator)
  return u * (1.0 - eps) + eps


def interpolate(x0, x1, t):
  """X_t = t X1 + (1 - t) X0 for a (B,) time vector and (B, ...) endpoints."""
  t = append_dims(t, x1.dim()).to(x1.dtype)
  return t * x1 + (1.0 - t) * x0


def velocity_target(x0, x1):
  """The velocity of the straight path, X1 - X0."""
  return x1 - x0


def per_sample_squared_error(prediction, target, reduction='mean'):
  """Squared error reduced over all but the batch dimension by 'mean' or 'sum', (B, ...) -> (B,)."""
  squared = (prediction - target).square().flatten(1)
  if reduction == 'mean':
    return squared.mean(dim=1)
  if reduction == 'sum':
    return squared.sum(dim=1)
  raise ValueError(f"Unknown reduction {reduction!r}; valid: 'mean', 'sum'")
