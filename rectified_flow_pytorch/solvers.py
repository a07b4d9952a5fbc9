"""ODE solvers for dx/dt = v(x, t) over a batch, counting network evaluations (NFE).

Every solver integrates from ``t0`` to ``t1``; t1 < t0 integrates backwards (data to noise). ``velocity(x, t)``
receives a (B,) time tensor.
"""
import math

import torch


class StraightnessMeter:
  """Streams S(Z) = (1/T) int ||(Z1 - Z0) - v(Z_t, t)||^2 / d dt (Liu et al. 2022, Def. 2.3) along a solve.

  Pass ``meter.on_step`` to a solver; it receives each step's start time, signed step h and the velocity at the
  step's start, and keeps running sums A = sum |h| v and B = sum |h| ||v||^2 / d (memory of one batch), so that
  S = ||D||^2 / d - 2 D.A / (T d) + B / T with D = Z1 - Z0 and T = sum |h|. ``value(z1)`` returns (B,).
  """

  def __init__(self, x0):
    self.x0 = x0
    self.weighted_velocity = torch.zeros_like(x0, dtype=torch.float64)
    self.weighted_square = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    self.total_time = 0.0

  def on_step(self, t, h, v):
    weight = abs(h)
    v = v.to(torch.float64)
    self.weighted_velocity += weight * v
    self.weighted_square += weight * v.flatten(1).square().mean(1)
    self.total_time += weight

  def value(self, z1):
    if self.total_time == 0:
      raise ValueError('No solver step was recorded: pass meter.on_step to the solver')
    displacement = (z1 - self.x0).to(torch.float64).flatten(1)
    d = displacement.shape[1]
    cross = (displacement * self.weighted_velocity.flatten(1)).sum(1) / d
    return (displacement.square().mean(1) - 2 * cross / self.total_time + self.weighted_square / self.total_time)


class CountedField:
  """Calls ``velocity(x, t)`` with t a (B,) tensor and counts the calls (one call = one NFE for the batch)."""

  def __init__(self, velocity):
    self.velocity = velocity
    self.nfe = 0

  def __call__(self, x, t):
    self.nfe += 1
    t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
    return self.velocity(x, t_batch)


def _check_steps(steps):
  if steps < 1:
    raise ValueError(f'A fixed-step solver needs at least one step, got steps={steps}')


@torch.no_grad()
def euler(velocity, x, *, steps, t0=0.0, t1=1.0, step_size=None, sigma_variance=0.0, noise_std=1.0,
          generator=None, on_step=None):
  """N Euler steps at t_i = t0 + i (t1 - t0) / N, each of size ``step_size`` (default (t1 - t0) / N).

  The published sampler is ``t0=eps, t1=1, step_size=1/N``. One step is x0 + v(x0, t0) (t1 - t0).
  ``sigma_variance > 0`` gives the published stochastic variant (forward direction only): noise of scale
  sigma_t = (1 - t) sigma_variance per step with the drift correction
  sigma_t^2 / (2 noise_std^2 (1 - t)^2) (t (1 - t) v / 2 - (2 - t) x / 2). Returns (x(t1), nfe).
  """
  _check_steps(steps)
  if sigma_variance and t1 < t0:
    raise ValueError('The stochastic Euler sampler (sigma_variance > 0) only runs forward, noise to data')
  field = CountedField(velocity)
  dt = (t1 - t0) / steps if step_size is None else math.copysign(step_size, t1 - t0)
  for i in range(steps):
    t = t0 + i / steps * (t1 - t0)
    v = field(x, t)
    if on_step is not None:
      on_step(t, dt, v)
    if sigma_variance:
      sigma_t = (1.0 - t) * sigma_variance
      correction = sigma_t ** 2 / (2 * noise_std ** 2 * max(1.0 - t, 1e-12) ** 2)
      drift = v + correction * (0.5 * t * (1.0 - t) * v - 0.5 * (2.0 - t) * x)
      noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator
                          else x.device).to(x.device)
      x = x + drift * dt + sigma_t * math.sqrt(dt) * noise
    else:
      x = x + v * dt
  return x, field.nfe


@torch.no_grad()
def second_order(velocity, x, *, steps, t0=0.0, t1=1.0, alpha=1.0, on_step=None):
  """Explicit two-stage Runge-Kutta (2nd order, 2 NFE per step): k1 = v(x, t), k2 = v(x + a h k1, t + a h),
  x += h ((1 - 1/(2a)) k1 + 1/(2a) k2). a = 1 is Heun's method (trapezoid), a = 1/2 the midpoint rule."""
  _check_steps(steps)
  field = CountedField(velocity)
  h = (t1 - t0) / steps
  second_weight = 1.0 / (2.0 * alpha)
  for i in range(steps):
    t = t0 + i * h
    k1 = field(x, t)
    if on_step is not None:
      on_step(t, h, k1)
    k2 = field(x + alpha * h * k1, t + alpha * h)
    x = x + h * ((1.0 - second_weight) * k1 + second_weight * k2)
  return x, field.nfe


def midpoint(velocity, x, *, steps, t0=0.0, t1=1.0, on_step=None):
  """The explicit midpoint rule. Returns (x(t1), nfe)."""
  return second_order(velocity, x, steps=steps, t0=t0, t1=t1, alpha=0.5, on_step=on_step)


def heun(velocity, x, *, steps, t0=0.0, t1=1.0, on_step=None):
  """Heun's method (explicit trapezoid). Returns (x(t1), nfe)."""
  return second_order(velocity, x, steps=steps, t0=t0, t1=t1, alpha=1.0, on_step=on_step)


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980), as used by scipy.integrate.RK45.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
# Difference between the 5th- and embedded 4th-order weights, over all 7 stages (FSAL).
_DP_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0
_ERROR_EXPONENT = -1.0 / 5.0  # -1 / (error estimator order + 1)


def _rms(x):
  """scipy's error norm: the RMS over every element of the (flattened) system."""
  return float(torch.linalg.vector_norm(x) / math.sqrt(x.numel()))


def _weighted_sum(coefficients, stages):
  return sum(c * k for c, k in zip(coefficients, stages) if c != 0.0)


@torch.no_grad()
def rk45(velocity, x, *, t0=1e-3, t1=1.0, rtol=1e-5, atol=1e-5, state_dtype=None, max_steps=100_000,
         on_step=None):
  """Adaptive Dormand-Prince RK45 with scipy.integrate.solve_ivp's step-size control.

  The whole batch is one flattened system (one error norm, one step size), as in the published sampler that
  called ``solve_ivp(..., method='RK45')``. ``state_dtype=torch.float64`` keeps the state in double precision as
  scipy does, while the velocity is evaluated in the dtype of ``x``. Returns (x(t1), nfe).
  """
  model_dtype = x.dtype
  y = x.to(state_dtype or model_dtype)
  field = CountedField(velocity)

  def f(t, state):
    return field(state.to(model_dtype), t).to(state.dtype)

  direction = 1.0 if t1 >= t0 else -1.0
  t = t0
  interval = abs(t1 - t0)
  if interval == 0.0:
    return y.to(model_dtype), field.nfe
  fy = f(t, y)
  # Initial step (Hairer, Norsett & Wanner 1993, Sec. II.4), as scipy's select_initial_step.
  scale = atol + y.abs() * rtol
  d0, d1 = _rms(y / scale), _rms(fy / scale)
  h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
  h0 = min(h0, interval)
  f1 = f(t + h0 * direction, y + h0 * direction * fy)
  d2 = _rms((f1 - fy) / scale) / h0
  h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
  h_abs = min(100 * h0, h1, interval)

  for _ in range(max_steps):
    if direction * (t - t1) >= 0:
      return y.to(model_dtype), field.nfe
    min_step = 10 * abs(math.nextafter(t, direction * math.inf) - t)
    h_abs = max(h_abs, min_step)
    rejected = False
    while True:
      if h_abs < min_step:
        raise RuntimeError(f'RK45 step size fell below {min_step:g} at t={t:g}; the velocity field is too stiff '
                           f'for rtol={rtol}, atol={atol}')
      t_new = t + h_abs * direction
      if direction * (t_new - t1) > 0:
        t_new = t1
      h = t_new - t
      h_abs = abs(h)
      stages = [fy]
      for c, a in zip(_DP_C[1:], _DP_A[1:]):
        stages.append(f(t + c * h, y + h * _weighted_sum(a, stages)))
      y_new = y + h * _weighted_sum(_DP_B, stages)
      f_new = f(t + h, y_new)
      stages.append(f_new)
      scale = atol + torch.maximum(y.abs(), y_new.abs()) * rtol
      error_norm = _rms(h * _weighted_sum(_DP_E, stages) / scale)
      if error_norm < 1:
        factor = _MAX_FACTOR if error_norm == 0 else min(_MAX_FACTOR, _SAFETY * error_norm ** _ERROR_EXPONENT)
        if rejected:
          factor = min(1.0, factor)
        h_abs *= factor
        break
      h_abs *= max(_MIN_FACTOR, _SAFETY * error_norm ** _ERROR_EXPONENT)
      rejected = True
    if on_step is not None:
      on_step(t, h, fy)
    t, y, fy = t_new, y_new, f_new
  raise RuntimeError(f'RK45 did not reach t={t1} within {max_steps} steps')


FIXED_STEP_SOLVERS = {'euler': euler, 'midpoint': midpoint, 'heun': heun}
SOLVERS = ('euler', 'heun', 'midpoint', 'rk45')


def solve(solver, velocity, x, *, t0, t1, steps=None, rtol=1e-5, atol=1e-5, state_dtype=None, on_step=None):
  """Integrates from t0 to t1 with a named solver: fixed-step ones take ``steps``, 'rk45' takes rtol/atol."""
  if solver == 'rk45':
    return rk45(velocity, x, t0=t0, t1=t1, rtol=rtol, atol=atol, state_dtype=state_dtype, on_step=on_step)
  if solver not in FIXED_STEP_SOLVERS:
    raise ValueError(f'Unknown solver {solver!r}; valid solvers: {list(SOLVERS)}')
  return FIXED_STEP_SOLVERS[solver](velocity, x, steps=steps, t0=t0, t1=t1, on_step=on_step)
