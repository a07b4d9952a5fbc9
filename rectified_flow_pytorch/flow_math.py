"""The rectified-flow math (Liu, Gong, Liu 2022, "Flow Straight and Fast").

Time runs from t=0 (noise, X0) to t=1 (data, X1). The linear interpolation
    X_t = t X1 + (1 - t) X0                         (Eq. (1) of Liu et al. 2022)
has the velocity dX_t/dt = X1 - X0, which the network v(X_t, t) regresses.
"""
import math

import torch


def append_dims(t, ndim):
  """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions in all, for broadcasting against a batch."""
  return t.reshape(t.shape[0], *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------------------------------
# Training-time distributions. Each maps u ~ U[0, 1) to a time in [0, 1]; ``sample_times`` then squeezes the result
# into [eps, 1]. All are written in this library's convention (t = 1 is data).

def _uniform(u):
  return u


def _logit_normal(u, mean=0.0, std=1.0):
  """t = sigmoid(mean + std * N(0, 1)) (Esser et al. 2024, Sec. 3.1). ``mean`` > 0 favours the data end here."""
  normal = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-7, 1 - 1e-7) - 1.0)
  return torch.sigmoid(mean + std * normal)


def _u_shaped(u, a=4.0):
  """p(t) proportional to cosh(a (2t - 1)), heavier at both ends, by its inverse CDF. That is Lee et al. 2024's
  U-shaped density exp(a' t) + exp(a' (1 - t)) with a' = 2a: their a' = 4 is a = 2 here (the default a = 4 is twice
  as sharp; the framework's ``reflow.u_shaped_a`` takes their a' and halves it)."""
  return 0.5 * (1.0 + torch.asinh((2.0 * u - 1.0) * math.sinh(a)) / a)


def _cosmap(u):
  """t = 1 - 1 / (tan(pi u / 2) + 1), density 2 / (pi (1 - 2t + 2t^2)) (Esser et al. 2024, Eq. 21)."""
  return 1.0 - 1.0 / (torch.tan(0.5 * math.pi * u) + 1.0)


TIME_DISTRIBUTIONS = {'uniform': _uniform, 'logit_normal': _logit_normal, 'u_shaped': _u_shaped,
                      'cosmap': _cosmap}


def sample_times(batch_size, distribution='uniform', *, eps=1e-3, device=None, dtype=torch.float32, generator=None,
                 **distribution_kwargs):
  """(B,) training times in [eps, 1] from a named distribution (uniform is the published U[eps, 1])."""
  if distribution not in TIME_DISTRIBUTIONS:
    raise ValueError(f'Unknown time distribution {distribution!r}; valid: {sorted(TIME_DISTRIBUTIONS)}')
  u = torch.rand(batch_size, device=device, dtype=dtype, generator=generator)
  t = TIME_DISTRIBUTIONS[distribution](u, **distribution_kwargs)
  return t * (1.0 - eps) + eps


def indexed_noise(seed, first_index, count, shape, scale=1.0):
  """Gaussian noise of samples first_index .. first_index + count - 1, each drawn from its own seed (seed, index).

  A sample's noise then depends neither on the batch it is drawn in nor on how work is split across processes.
  """
  noises = [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2**32 + index))
            for index in range(first_index, first_index + count)]
  return torch.stack(noises) * scale


def interpolate(x0, x1, t):
  """X_t = t X1 + (1 - t) X0 for a (B,) time vector and (B, ...) endpoints."""
  t = append_dims(t, x1.dim()).to(x1.dtype)
  return t * x1 + (1.0 - t) * x0


def velocity_target(x0, x1):
  """The velocity of the straight path, X1 - X0."""
  return x1 - x0


# ----------------------------------------------------------------------------------------------------------------
# What the network predicts: the velocity ('flow'), the noise X0 ('noise') or the data X1 ('clean').

PREDICTIONS = ('flow', 'noise', 'clean')


def prediction_target(predict, x0, x1):
  """The regression target of a network that predicts ``predict``."""
  if predict == 'flow':
    return x1 - x0
  if predict == 'noise':
    return x0
  if predict == 'clean':
    return x1
  raise ValueError(f'Unknown prediction {predict!r}; valid: {list(PREDICTIONS)}')


def to_velocity(predict, prediction, x_t, t, min_denominator=1e-3):
  """The velocity implied by a prediction at (x_t, t).

  From X_t = t X1 + (1 - t) X0: v = (X_t - X0) / t for a noise prediction and v = (X1 - X_t) / (1 - t) for a clean
  one; the denominators are clamped at ``min_denominator`` near the singular end.
  """
  if predict == 'flow':
    return prediction
  t = append_dims(t, x_t.dim()).to(x_t.dtype)
  if predict == 'noise':
    return (x_t - prediction) / t.clamp(min=min_denominator)
  if predict == 'clean':
    return (prediction - x_t) / (1.0 - t).clamp(min=min_denominator)
  raise ValueError(f'Unknown prediction {predict!r}; valid: {list(PREDICTIONS)}')


def to_clean(predict, prediction, x_t, t, min_denominator=1e-3):
  """The data estimate X1_hat implied by a prediction: X_t + (1 - t) v for a velocity."""
  if predict == 'clean':
    return prediction
  if predict == 'flow':
    return x_t + (1.0 - append_dims(t, x_t.dim()).to(x_t.dtype)) * prediction
  if predict == 'noise':
    t = append_dims(t, x_t.dim()).to(x_t.dtype)
    return (x_t - (1.0 - t) * prediction) / t.clamp(min=min_denominator)
  raise ValueError(f'Unknown prediction {predict!r}; valid: {list(PREDICTIONS)}')


# ----------------------------------------------------------------------------------------------------------------
# Per-sample losses, (B, ...) -> (B,).

def per_sample_squared_error(prediction, target, reduction='mean'):
  """Squared error reduced over all but the batch dimension by 'mean' or 'sum', (B, ...) -> (B,)."""
  squared = (prediction - target).square().flatten(1)
  if reduction == 'mean':
    return squared.mean(dim=1)
  if reduction == 'sum':
    return squared.sum(dim=1)
  raise ValueError(f"Unknown reduction {reduction!r}; valid: 'mean', 'sum'")


def pseudo_huber_constant(data_dim):
  """c = 0.00054 sqrt(d) (Song & Dhariwal 2023; used by Lee et al. 2024), for d data dimensions."""
  return 0.00054 * math.sqrt(data_dim)


def per_sample_pseudo_huber(prediction, target, c=None):
  """sqrt(||prediction - target||^2 + c^2) - c on each sample's whole vector, (B,)."""
  difference = (prediction - target).flatten(1)
  c = pseudo_huber_constant(difference.shape[1]) if c is None else c
  return torch.sqrt(difference.square().sum(dim=1) + c * c) - c


# ----------------------------------------------------------------------------------------------------------------
# Class conditioning. A model of ``num_classes`` classes has one more label, ``num_classes`` itself, meaning "no
# label"; training replaces labels by it at random (label dropout), so that one network learns both the conditional
# velocity v(x, t | c) and the unconditional one v(x, t | null) that classifier-free guidance combines.

def null_labels(batch_size, num_classes, device=None):
  """(B,) labels that all say "no label" (the index ``num_classes``)."""
  return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)


def check_labels(labels, num_classes, batch_size):
  """Raises a ValueError unless ``labels`` is a (B,) integer tensor of classes in [0, num_classes]."""
  if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != batch_size:
    shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
    raise ValueError(f'labels must be a ({batch_size},) tensor of class indices, one per sample; got {shape}')
  if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
    raise ValueError(f'labels must be integers (class indices), got {labels.dtype}')


def draw_label_drops(batch_size, probability, *, device=None, generator=None):
  """(B,) bools, each True with ``probability``: the samples whose label dropout replaces by the null label."""
  return torch.rand(batch_size, device=device, generator=generator) < probability


def drop_labels(labels, drops, num_classes):
  """``labels`` with the rows where ``drops`` is True replaced by the null label ``num_classes``."""
  return torch.where(drops.to(labels.device), torch.full_like(labels, num_classes), labels)


def guided_velocity(conditional, unconditional, guidance_scale, times=None, interval=None):
  """Classifier-free guidance (Ho & Salimans 2022) on velocities: v = v_null + w (v_cond - v_null).

  w = 1 is the conditional velocity, w = 0 the unconditional one, w > 1 pushes away from the unconditional one.
  The velocity is affine in a noise or data prediction at fixed (x_t, t), so guiding after ``to_velocity`` equals
  guiding the predictions. With an ``interval`` (t_min, t_max), only the samples whose ``times`` (B,) lie in it
  are guided; the others keep their conditional velocity, exactly (``in_guidance_interval``).
  """
  guided = unconditional + guidance_scale * (conditional - unconditional)
  if interval is None:
    return guided
  inside = in_guidance_interval(times, interval).reshape(-1, *([1] * (conditional.dim() - 1)))
  return torch.where(inside, guided, conditional)


def check_guidance_interval(interval):
  """Raises a ValueError unless ``interval`` is None or (t_min, t_max) with 0 <= t_min < t_max <= 1."""
  if interval is None:
    return
  try:
    t_min, t_max = (float(value) for value in interval)
  except (TypeError, ValueError):
    raise ValueError(f'guidance_interval must be None or (t_min, t_max), two times in [0, 1]; got {interval!r}')
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f'guidance_interval=({t_min}, {t_max}) needs 0 <= t_min < t_max <= 1 (t = 0 is noise, 1 '
                     f'data), e.g. (0.5, 1.0) to guide only the half of the path nearer the data')


def in_guidance_interval(times, interval):
  """(B,) bools: which of the (B,) ``times`` lie in the guidance interval (t_min, t_max), both ends included.

  Guidance limited to an interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves
  sample and distribution quality in diffusion models"): guidance at the noisiest times pulls every sample of a class
  towards a few modes, while the class is mostly decided at intermediate times. In this library's convention t = 0
  is noise, so (0.5, 1.0) guides the half of the path nearer the data. Computed without branching on ``times``, so
  that it runs inside a CUDA graph.
  """
  t_min, t_max = (float(value) for value in interval)
  return (times >= t_min) & (times <= t_max)
