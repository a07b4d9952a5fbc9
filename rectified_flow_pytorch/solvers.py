"""ODE solvers for dx/dt = v(x, t) over a batch, counting network evaluations (NFE).

Every solver integrates from ``t0`` to ``t1``; t1 < t0 integrates backwards (data to noise). ``velocity(x, t)``
receives a (B,) time tensor on the device of x. Every solver returns an ``ODESolution``, which unpacks as
``(x(t1), nfe)``.
"""
import math

import torch


class StraightnessMeter:
  """Streams S(Z) = (1/T) int ||(Z1 - Z0) - v(Z_t, t)||^2 / d dt (Liu et al. 2022, Def. 2.3) along a solve.

  Pass ``meter.on_step`` to a solver; it receives each step's start time, signed step h and the velocity at the
  step's start, and keeps running sums A = sum |h| v and B = sum |h| ||v||^2 / d (memory of one batch), so that
  S = ||D||^2 / d - 2 D.A / (T d) + B / T with D = Z1 - Z0 and T = sum |h|. ``value(z1)`` returns (B,).
  t and h may be floats or 0-d tensors; RK45 passes h = 0 for attempts it did not take, so only accepted steps
  weigh, and nothing here reads a device value on the host until ``value``.
  """

  def __init__(self, x0):
    self.x0 = x0
    self.weighted_velocity = torch.zeros_like(x0, dtype=torch.float64)
    self.weighted_square = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    self.total_time = torch.zeros((), dtype=torch.float64, device=x0.device)

  def on_step(self, t, h, v):
    weight = abs(h)
    v = v.to(torch.float64)
    self.weighted_velocity += weight * v
    self.weighted_square += weight * v.flatten(1).square().mean(1)
    self.total_time += weight

  def value(self, z1):
    if not self.total_time > 0:
      raise ValueError('No solver step was recorded: pass meter.on_step to the solver')
    displacement = (z1 - self.x0).to(torch.float64).flatten(1)
    d = displacement.shape[1]
    cross = (displacement * self.weighted_velocity.flatten(1)).sum(1) / d
    return (displacement.square().mean(1) - 2 * cross / self.total_time + self.weighted_square / self.total_time)


class ODESolution(tuple):
  """``(x(t1), nfe)`` with the solver's accounting as attributes; it unpacks as that pair (like os.stat_result).

  ``nfe`` is every network call made. RK45 reads its done flag on the host only every ``sync_every`` attempted
  steps, so up to 6 (sync_every - 1) calls after the end are masked out and change nothing: ``contributing_nfe``
  counts the calls that shaped x (what scipy's solve_ivp reports as nfev), ``accepted_steps`` and
  ``rejected_steps`` the attempts among them, ``host_reads`` the device -> host transfers of the solve.
  """

  def __new__(cls, x, nfe, *, contributing_nfe=None, accepted_steps=None, rejected_steps=0, host_reads=0):
    solution = super().__new__(cls, (x, nfe))
    solution.contributing_nfe = nfe if contributing_nfe is None else contributing_nfe
    solution.accepted_steps = accepted_steps
    solution.rejected_steps = rejected_steps
    solution.host_reads = host_reads
    return solution

  def __getnewargs_ex__(self):  # Pickling: rebuild from (x, nfe); the attributes travel in __dict__.
    return (self.x, self.nfe), {}

  def with_x(self, x):
    """The same solve's accounting around another x, e.g. x(t1) cast from the state dtype to the noise's."""
    return ODESolution(x, self.nfe, contributing_nfe=self.contributing_nfe, accepted_steps=self.accepted_steps,
                       rejected_steps=self.rejected_steps, host_reads=self.host_reads)

  def with_evaluations_per_call(self, evaluations):
    """The same solve with every call counted as ``evaluations`` network evaluations per sample (2 for a guided
    velocity, whose one call evaluates the network on the batch doubled)."""
    return ODESolution(self.x, self.nfe * evaluations, contributing_nfe=self.contributing_nfe * evaluations,
                       accepted_steps=self.accepted_steps, rejected_steps=self.rejected_steps,
                       host_reads=self.host_reads)

  @property
  def x(self):
    return self[0]

  @property
  def nfe(self):
    return self[1]


class CountedField:
  """Calls ``velocity(x, t)`` with t a (B,) tensor and counts the calls (one call = one NFE for the batch).

  t is a float or a 0-d tensor; a tensor is broadcast on its own device, so no value travels to the host.
  """

  def __init__(self, velocity):
    self.velocity = velocity
    self.nfe = 0

  def __call__(self, x, t):
    self.nfe += 1
    if isinstance(t, torch.Tensor):
      t_batch = x.new_empty(x.shape[0]).copy_(t)
    else:
      t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    return self.velocity(x, t_batch)


def _check_steps(steps):
  if steps < 1:
    raise ValueError(f'A fixed-step solver needs at least one step, got steps={steps}')


# The most noise values the stochastic Euler sampler draws from a CPU generator (and copies to x's device) at once.
_NOISE_CHUNK_ELEMENTS = 2 ** 24


def _step_noise(shape, steps, dtype, device, generator):
  """The standard normals of ``shape`` of each of ``steps`` steps on ``device``: those of ``torch.randn(shape,
  generator=generator, dtype=dtype)`` drawn step by step on the generator's device (``device`` without one).

  A CPU generator (the framework's, seeded per sample block) draws several steps' noise in one call, moved to
  ``device`` with one copy (on CUDA, one host draw and one host -> device copy per chunk of at most
  ``_NOISE_CHUNK_ELEMENTS`` values, not per step). The values are those of step-by-step draws, bit for bit: the CPU
  normal kernel turns blocks of 16 uniforms into 16 normals, so k draws of a multiple of 16 values are one draw of
  k times as many (tests/test_samplers.py checks it); other sizes, and generators on other devices (a generator on
  x's device needs no copy), draw step by step.
  """
  draw_device = torch.device(device) if generator is None else generator.device
  size = math.prod(shape)
  per_draw = 1
  if draw_device.type == 'cpu' and size % 16 == 0:
    per_draw = max(1, _NOISE_CHUNK_ELEMENTS // max(size, 1))
  for first in range(0, steps, per_draw):
    count = min(per_draw, steps - first)
    yield from torch.randn((count, *shape), generator=generator, dtype=dtype, device=draw_device).to(device)


@torch.no_grad()
def euler(velocity, x, *, steps, t0=0.0, t1=1.0, step_size=None, sigma_variance=0.0, noise_std=1.0,
          generator=None, on_step=None):
  """N Euler steps at t_i = t0 + i (t1 - t0) / N, each of size ``step_size`` (default (t1 - t0) / N).

  The published sampler is ``t0=eps, t1=1, step_size=1/N``. One step is x0 + v(x0, t0) (t1 - t0).
  ``sigma_variance > 0`` gives the published stochastic variant (forward direction only): noise of scale
  sigma_t = (1 - t) sigma_variance per step with the drift correction
  sigma_t^2 / (2 noise_std^2 (1 - t)^2) (t (1 - t) v / 2 - (2 - t) x / 2). Returns (x(t1), nfe).
  Its noise comes from ``generator`` (``_step_noise``: step by step, in the dtype x has at the start).
  """
  _check_steps(steps)
  if sigma_variance and t1 < t0:
    raise ValueError('The stochastic Euler sampler (sigma_variance > 0) only runs forward, noise to data')
  field = CountedField(velocity)
  dt = (t1 - t0) / steps if step_size is None else math.copysign(step_size, t1 - t0)
  noises = _step_noise(x.shape, steps, x.dtype, x.device, generator) if sigma_variance else None
  for i in range(steps):
    t = t0 + i / steps * (t1 - t0)
    v = field(x, t)
    if on_step is not None:
      on_step(t, dt, v)
    if sigma_variance:
      sigma_t = (1.0 - t) * sigma_variance
      correction = sigma_t ** 2 / (2 * noise_std ** 2 * max(1.0 - t, 1e-12) ** 2)
      drift = v + correction * (0.5 * t * (1.0 - t) * v - 0.5 * (2.0 - t) * x)
      x = x + drift * dt + sigma_t * math.sqrt(dt) * next(noises)
    else:
      x = x + v * dt
  return ODESolution(x, field.nfe, accepted_steps=steps)


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
  return ODESolution(x, field.nfe, accepted_steps=steps)


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
  """scipy's error norm: the RMS over every element of the (flattened) system, as a 0-d float64 tensor."""
  return torch.linalg.vector_norm(x, dtype=torch.float64) / math.sqrt(x.numel())


def _weighted_sum(coefficients, stages):
  return sum(c * k for c, k in zip(coefficients, stages) if c != 0.0)


def _read_host(tensor):
  """The adaptive solver's only device -> host transfer (on CUDA, a synchronisation): ``tensor.tolist()``."""
  return tensor.tolist()


def _device_vector(values, device):
  """A float64 vector of Python floats made on ``device`` by fill kernels (no host -> device copy, so no sync)."""
  vector = torch.empty(len(values), dtype=torch.float64, device=device)
  for i, value in enumerate(values):
    vector[i] = value
  return vector


def _initial_step(f, t0, y, fy, direction, interval, rtol, atol):
  """scipy's select_initial_step (Hairer, Norsett & Wanner 1993, Sec. II.4) with its branches as torch.where.

  d0 = ||y0||, d1 = ||f0|| with f0 = f(t0, y0); h0 = 0.01 d0 / d1 (1e-6 if d0 or d1 is below 1e-5);
  d2 = ||f(t0 + h0, y0 + h0 f0) - f0|| / h0; h1 = (0.01 / max(d1, d2))^(1/5) (max(1e-6, 1e-3 h0) if
  max(d1, d2) <= 1e-15); h = min(100 h0, h1). Norms are RMS in the scale atol + |y0| rtol, h0 and h at most the
  interval. Returns a 0-d float64 tensor.
  """
  scale = atol + y.abs() * rtol
  d0, d1 = _rms(y / scale), _rms(fy / scale)
  h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1).clamp(max=interval)
  f1 = f(t0 + h0 * direction, y + h0 * direction * fy)
  d2 = _rms((f1 - fy) / scale) / h0
  d_max = torch.maximum(d1, d2)
  h1 = torch.where(d_max <= 1e-15, (h0 * 1e-3).clamp(min=1e-6), (0.01 / d_max) ** (1 / 5))
  return torch.minimum(100 * h0, h1).clamp(max=interval)


@torch.no_grad()
def rk45(velocity, x, *, t0=1e-3, t1=1.0, rtol=1e-5, atol=1e-5, state_dtype=None, max_steps=100_000, sync_every=1,
         on_step=None):
  """Adaptive Dormand-Prince RK45 with scipy.integrate.solve_ivp's error norm, initial step and step-size control.

  The whole batch is one flattened system (one error norm, one step size), as in the published sampler that
  called ``solve_ivp(..., method='RK45')``. ``state_dtype=torch.float64`` keeps the state in double precision as
  scipy does, while the velocity is evaluated in the dtype of ``x``.

  Every step-control scalar (t, |h|, the error norm, accept/reject, running, done) is a 0-d float64 or bool tensor
  on the device of x, and accept/reject is applied by torch.where, so the loop never waits for the device. Each
  iteration attempts one step (6 calls; the 7th stage is the next step's first, FSAL). The host reads the running
  flag (neither done nor failed) every ``sync_every`` attempts (``_read_host``) and once more at the end for the
  counts; attempts made after the end, before the host notices, are masked out, so x(t1) is bitwise the same for
  every ``sync_every`` and only ``nfe`` grows, by at most 6 (sync_every - 1). ``max_steps`` bounds the attempts. A
  step size below scipy's 10 ulp(t), or a non-finite one, raises at the next host read with the t where it
  happened. ``on_step(t, h, v)`` gets every attempt's start time, h (0 where the attempt was not taken) and start
  velocity, as tensors. Returns ``ODESolution(x(t1), nfe)`` with contributing_nfe, accepted_steps, rejected_steps
  and host_reads.
  """
  if sync_every < 1:
    raise ValueError(f'sync_every must be at least 1, got {sync_every}')
  model_dtype = x.dtype
  y = x.to(state_dtype or model_dtype)
  field = CountedField(velocity)

  def f(t, state):
    return field(state.to(model_dtype), t).to(state.dtype)

  if t1 == t0:
    return ODESolution(y.to(model_dtype), 0, accepted_steps=0)
  device = y.device
  direction = 1.0 if t1 > t0 else -1.0
  t = torch.full((), t0, dtype=torch.float64, device=device)
  toward_end = torch.full((), direction * math.inf, dtype=torch.float64, device=device)
  stage_nodes = _device_vector(_DP_C[1:] + (1.0,), device)  # c_2..c_6 and 1: the stages' and f_new's times.
  fy = f(t, y)
  h_abs = _initial_step(f, t, y, fy, direction, abs(t1 - t0), rtol, atol)
  running = torch.ones((), dtype=torch.bool, device=device)  # Neither at t1 nor failed.
  done = torch.zeros((), dtype=torch.bool, device=device)
  rejected = torch.zeros((), dtype=torch.bool, device=device)  # The step in progress had a rejected attempt.
  accepted_steps = torch.zeros((), dtype=torch.int64, device=device)
  contributing_attempts = torch.zeros((), dtype=torch.int64, device=device)
  host_reads = 0

  for attempt in range(1, max_steps + 1):
    # scipy's RkAdaptive._step_impl: a step starts with |h| raised to min_step = 10 |nextafter(t) - t|; an attempt
    # whose |h| has fallen below it fails (a NaN |h| fails too).
    min_step = 10 * (torch.nextafter(t, toward_end) - t).abs()
    h_abs = torch.where(rejected, h_abs, torch.maximum(h_abs, min_step))
    running = running & (h_abs >= min_step)
    t_new = t + h_abs * direction
    t_new = t_new.clamp(max=t1) if direction > 0 else t_new.clamp(min=t1)  # Never step past t1.
    h = t_new - t
    stage_times = t + h * stage_nodes
    stages = [fy]
    for i, a in enumerate(_DP_A[1:]):
      stages.append(f(stage_times[i], y + h * _weighted_sum(a, stages)))
    y_new = y + h * _weighted_sum(_DP_B, stages)
    f_new = f(stage_times[5], y_new)
    stages.append(f_new)
    scale = atol + torch.maximum(y.abs(), y_new.abs()) * rtol
    error_norm = _rms(h * _weighted_sum(_DP_E, stages) / scale)
    # Accepted (error < 1): |h| *= min(10, 0.9 err^(-1/5)), at most 1 after a rejection in the same step (err = 0
    # gives inf -> 10); rejected: |h| *= max(0.2, 0.9 err^(-1/5)).
    below_tolerance = error_norm < 1
    growth = _SAFETY * error_norm ** _ERROR_EXPONENT
    grow = growth.clamp(max=_MAX_FACTOR)
    factor = torch.where(below_tolerance, torch.where(rejected, grow.clamp(max=1.0), grow),
                         growth.clamp(min=_MIN_FACTOR))
    h_abs = torch.where(running, h.abs() * factor, h_abs)
    rejected = torch.where(running, ~below_tolerance, rejected)
    accept = running & below_tolerance
    if on_step is not None:
      on_step(t, torch.where(accept, h, 0.0), fy)
    t = torch.where(accept, t_new, t)
    y = torch.where(accept, y_new, y)
    fy = torch.where(accept, f_new, fy)
    accepted_steps += accept
    contributing_attempts += running
    reached = accept & (t_new == t1)  # t_new is clamped to t1, so equality is scipy's direction (t - t1) >= 0.
    done = done | reached
    running = running & ~reached
    if attempt % sync_every == 0:
      host_reads += 1
      if not _read_host(running):
        break

  host_reads += 1
  is_running, is_done, t_end, h_end, accepted, attempts = _read_host(torch.stack(
      [running.double(), done.double(), t, h_abs, accepted_steps.double(), contributing_attempts.double()]))
  if not (is_running or is_done):
    if not math.isfinite(h_end):
      raise RuntimeError(f'RK45 step size became non-finite after t={t_end!r}: the velocity (or the error estimate) '
                         f'is not finite there')
    min_step = 10 * abs(math.nextafter(t_end, direction * math.inf) - t_end)
    raise RuntimeError(f'RK45 step size fell below {min_step:g} at t={t_end!r}; the velocity field is too stiff for '
                       f'rtol={rtol}, atol={atol}')
  if is_running:
    raise RuntimeError(f'RK45 did not reach t={t1} within {max_steps} attempted steps (at t={t_end:g})')
  accepted, attempts = int(accepted), int(attempts)
  return ODESolution(y.to(model_dtype), field.nfe, contributing_nfe=2 + 6 * attempts, accepted_steps=accepted,
                     rejected_steps=attempts - accepted, host_reads=host_reads)


FIXED_STEP_SOLVERS = {'euler': euler, 'midpoint': midpoint, 'heun': heun}
SOLVERS = ('euler', 'heun', 'midpoint', 'rk45')


def solve(solver, velocity, x, *, t0, t1, steps=None, rtol=1e-5, atol=1e-5, state_dtype=None, sync_every=1,
          on_step=None):
  """Integrates from t0 to t1 with a named solver: fixed-step ones take ``steps``, 'rk45' takes rtol, atol,
  state_dtype and sync_every. Returns an ``ODESolution`` (unpacks as ``(x(t1), nfe)``)."""
  if solver == 'rk45':
    return rk45(velocity, x, t0=t0, t1=t1, rtol=rtol, atol=atol, state_dtype=state_dtype, sync_every=sync_every,
                on_step=on_step)
  if solver not in FIXED_STEP_SOLVERS:
    raise ValueError(f'Unknown solver {solver!r}; valid solvers: {list(SOLVERS)}')
  return FIXED_STEP_SOLVERS[solver](velocity, x, steps=steps, t0=t0, t1=t1, on_step=on_step)
