"""The importable library: the seed document's usage, every option, closed forms, and reflow on a 2-D toy."""
import math

import pytest
import torch
from torch import nn

from rectified_flow_pytorch import RectifiedFlow, Reflow, flow_math, solvers

# ---------------------------------------------------------------------------------------------------------------
# The two usage snippets of the seed document, verbatim, then checked against closed forms. The snippets' model, a
# 1x1 convolution without a time input, is the linear field v(x) = W x + b on each pixel's 3 channels: N Euler steps
# x <- (I + W/N) x + b/N take X0 to A X0 + c, and the loss of X_t = t X1 + (1 - t) X0 is quadratic in the noise.

def conv_field(model):
  """(W (3, 3), b (3,)) of a 1x1 convolution, in float64."""
  return model.weight.detach()[:, :, 0, 0].double(), model.bias.detach().double()


def euler_end_map(weight, bias, steps):
  """(A, c): ``steps`` Euler steps of dx/dt = W x + b over [0, 1] take x0 to A x0 + c."""
  step = torch.eye(len(bias), dtype=torch.float64) + weight / steps
  a, c = torch.eye(len(bias), dtype=torch.float64), torch.zeros_like(bias)
  for _ in range(steps):
    a, c = step @ a, step @ c + bias / steps
  return a, c


def assert_pixels_are_gaussian(images, mean, covariance, standard_errors=5):
  """The pixels of (B, C, H, W) ``images`` are B H W draws of N(mean, covariance) over the channels: their
  empirical channel mean and covariance lie within ``standard_errors`` standard errors of the closed form."""
  pixels = images.transpose(0, 1).flatten(1).double()  # (C, B H W)
  count, variance = pixels.shape[1], covariance.diagonal()
  assert ((pixels.mean(1) - mean).abs() <= standard_errors * (variance / count).sqrt()).all(), (pixels.mean(1), mean)
  covariance_error = ((variance[:, None] * variance[None, :] + covariance ** 2) / count).sqrt()
  assert ((torch.cov(pixels) - covariance).abs() <= standard_errors * covariance_error).all(), (
      torch.cov(pixels), covariance)


def range_over_times(loss_at, eps=1e-3):
  """(min, max) of ``loss_at(t)`` over the training times t in [eps, 1]."""
  values = [loss_at(t) for t in torch.linspace(eps, 1.0, 1001, dtype=torch.float64).tolist()]
  return min(values), max(values)


LOSS_NOISE = 0.03  # Over 3 x 256 x 256 values per sample, a loss strays up to about 1% from its expectation.


def test_seed_snippet_rectified_flow():
  model = nn.Conv2d(3, 3, 1)
  rectified_flow = RectifiedFlow(model, time_cond_kwarg=None)
  images = torch.randn(1, 3, 256, 256)
  loss = rectified_flow(images)
  loss.backward()
  sampled = rectified_flow.sample()
  assert sampled.shape[1:] == images.shape[1:]
  # The loss is the mean over pixels and channels of |v(X_t) - (X1 - X0)|^2 at one t, X0 ~ N(0, I): the residual
  # (t W - I) X1 + b + ((1 - t) W + I) X0 has expectation |(t W - I) X1 + b|^2 + ||(1 - t) W + I||_F^2 per pixel.
  weight, bias = conv_field(model)
  x1 = images[0].flatten(1).double()  # (3, 256 256)
  second_moment, first_moment, identity = x1 @ x1.T / x1.shape[1], x1.mean(1), torch.eye(3, dtype=torch.float64)

  def expected_loss(t):
    data_part, noise_part = t * weight - identity, (1 - t) * weight + identity
    return ((data_part @ second_moment @ data_part.T).trace() + 2 * bias @ data_part @ first_moment + bias @ bias
            + noise_part.square().sum()).item() / 3

  low, high = range_over_times(expected_loss)
  assert low * (1 - LOSS_NOISE) <= loss.item() <= high * (1 + LOSS_NOISE), (loss.item(), low, high)
  assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0
  # sample() takes 16 Euler steps (its default) from X0 ~ N(0, I): each pixel is N(c, A A^T).
  end, offset = euler_end_map(weight, bias, steps=16)
  assert_pixels_are_gaussian(sampled, offset, end @ end.T)


def test_seed_snippet_reflow():
  model = nn.Conv2d(3, 3, 1)
  rectified_flow = RectifiedFlow(model, time_cond_kwarg=None)
  images = torch.randn(1, 3, 256, 256)
  loss = rectified_flow(images)
  loss.backward()
  reflow = Reflow(rectified_flow)
  reflow_loss = reflow()
  reflow_loss.backward()
  sampled = reflow.sample()
  assert sampled.shape[1:] == images.shape[1:]
  # The student trains, the frozen teacher does not; reflowing again works.
  assert model.weight.grad is not None
  assert all(p.grad is None and not p.requires_grad for p in reflow.frozen_model.parameters())
  again = Reflow(reflow.model)
  again().backward()
  # The teacher's pairs are its 20 Euler steps (Reflow's default) from X0: X1 = A X0 + c on each pixel.
  weight, bias = conv_field(model)
  end, offset = euler_end_map(weight, bias, steps=20)
  x0, x1 = reflow.generate_pairs(batch_size=2)
  expected = torch.einsum('ij,bjhw->bihw', end, x0.double()) + offset[None, :, None, None]
  torch.testing.assert_close(x1.double(), expected, rtol=1e-5, atol=1e-5)
  # The reflow loss: the student (still the teacher's weights) on those pairs, X_t = (t A + (1 - t) I) X0 + t c, has
  # the residual (W (t A + (1 - t) I) - (A - I)) X0 + t W c + b - c: its expectation per pixel is the squared
  # Frobenius norm of that matrix plus the square of that vector. Each of the 16 pairs has its own t.
  identity = torch.eye(3, dtype=torch.float64)

  def expected_loss(t):
    noise_part = weight @ (t * end + (1 - t) * identity) - (end - identity)
    constant = t * weight @ offset + bias - offset
    return (noise_part.square().sum() + constant @ constant).item() / 3

  low, high = range_over_times(expected_loss)
  assert low * (1 - LOSS_NOISE) <= reflow_loss.item() <= high * (1 + LOSS_NOISE), (reflow_loss.item(), low, high)
  # sample() is the student's: 16 Euler steps of the same field.
  end16, offset16 = euler_end_map(weight, bias, steps=16)
  assert_pixels_are_gaussian(sampled, offset16, end16 @ end16.T)
  # The teacher is a copy: changing the student leaves its pairs as they were.
  with torch.no_grad():
    model.weight.mul_(-1.0)
  torch.testing.assert_close(reflow.generate_pairs(noise=x0)[1], x1)


def test_reflow_pairs_are_the_teachers_ode_solutions():
  a = torch.tensor(0.7)
  model = nn.Module()
  model.forward = lambda x, times: a * x  # v = a x: Euler gives x0 (1 + a/N)^N.
  rf = RectifiedFlow(model, time_cond_kwarg='times')
  rf.data_shape = (3,)
  reflow = Reflow(rf, frozen_model=rf, teacher_steps=5)
  x0, x1 = reflow.generate_pairs(batch_size=4)
  torch.testing.assert_close(x1, x0 * (1 + 0.7 / 5) ** 5)


# ---------------------------------------------------------------------------------------------------------------
# Sampling API.

def test_one_euler_step_is_one_evaluation_at_time_zero():
  calls = []

  class Recorder(nn.Module):
    def forward(self, x, times):
      calls.append(times.clone())
      return torch.ones_like(x) * 2.0

  rf = RectifiedFlow(Recorder())
  x0 = torch.randn(5, 4)
  x1 = rf.sample(noise=x0, steps=1, solver='euler')
  assert rf.last_sample_nfe == 1 and len(calls) == 1
  assert torch.all(calls[0] == 0)
  torch.testing.assert_close(x1, x0 + 2.0)


@pytest.mark.parametrize('shape', [(7,), (3, 8, 8), (2, 4, 6, 6)])  # vectors, images, video
def test_any_data_shape_round_trips_through_training_and_sampling(shape):
  class Pointwise(nn.Module):
    def __init__(self):
      super().__init__()
      self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, times):
      return self.scale * x + flow_math.append_dims(times, x.dim())

  rf = RectifiedFlow(Pointwise())
  data = torch.randn(4, *shape)
  rf(data).backward()
  assert rf.sample(batch_size=3).shape == (3, *shape)
  assert rf.sample(batch_size=2, solver='heun', steps=3).shape == (2, *shape)


def velocity_3t2x(x, times):
  return 3 * flow_math.append_dims(times, x.dim()) ** 2 * x


@pytest.mark.parametrize('solver,order', [('euler', 1), ('midpoint', 2), ('heun', 2)])
def test_fixed_step_solvers_converge_at_their_order(solver, order):
  # dx/dt = 3 t^2 x on [0, 1]: x(1) = e x(0).
  x0 = torch.randn(4, 3, dtype=torch.float64)
  errors = []
  for steps in (20, 40):
    x1, nfe = solvers.solve(solver, velocity_3t2x, x0, t0=0.0, t1=1.0, steps=steps)
    assert nfe == steps * (1 if solver == 'euler' else 2)
    errors.append((x1 - math.e * x0).abs().max().item())
  assert errors[0] / errors[1] == pytest.approx(2 ** order, rel=0.15)


@pytest.mark.parametrize('solver', ['euler', 'midpoint', 'heun', 'rk45'])
def test_reverse_integration_runs_the_flow_backwards(solver):
  x1 = torch.randn(4, 3, dtype=torch.float64)
  x0, _ = solvers.solve(solver, velocity_3t2x, x1, t0=1.0, t1=0.0, steps=400, rtol=1e-9, atol=1e-9)
  tolerance = {'euler': 1e-2, 'midpoint': 1e-4, 'heun': 1e-4, 'rk45': 1e-6}[solver]
  torch.testing.assert_close(x0, x1 / math.e, rtol=tolerance, atol=0)


@pytest.mark.parametrize('t0,t1', [(1e-3, 1.0), (1.0, 0.0)])
def test_rk45_masks_the_attempts_after_the_end_so_sync_every_changes_only_the_call_count(t0, t1):
  x = torch.randn(4, 3, dtype=torch.float64)
  runs = {}
  for sync_every in (1, 2, 4):
    meter = solvers.StraightnessMeter(x)
    solution = solvers.rk45(velocity_3t2x, x, t0=t0, t1=t1, rtol=1e-6, atol=1e-6, sync_every=sync_every,
                            on_step=meter.on_step)
    runs[sync_every] = solution, meter.value(solution.x)
  reference, reference_straightness = runs[1]
  torch.testing.assert_close(reference.x, x * math.exp(t1 ** 3 - t0 ** 3), rtol=1e-5, atol=0)
  assert reference.nfe == reference.contributing_nfe == 2 + 6 * (reference.accepted_steps + reference.rejected_steps)
  for sync_every, (solution, straightness) in runs.items():
    assert torch.equal(solution.x, reference.x) and torch.equal(straightness, reference_straightness)
    assert solution.contributing_nfe == reference.nfe
    assert (solution.accepted_steps, solution.rejected_steps) == (reference.accepted_steps, reference.rejected_steps)
    assert reference.nfe <= solution.nfe <= reference.nfe + 6 * (sync_every - 1)
    assert (solution.nfe - 2) // 6 % sync_every == 0  # The loop stops only at a host read.


def test_rk45_raises_at_the_next_host_read_where_the_step_size_collapses():
  def singular_at_half(x, times):  # x(t) = x0 / (1 - 2t): the step size shrinks to 10 ulp(t) as t -> 0.5.
    return x / (0.5 - flow_math.append_dims(times, x.dim()))

  def not_finite_after_half(x, times):
    return torch.where(flow_math.append_dims(times, x.dim()) < 0.5, x, math.nan)

  x = torch.full((2, 3), 2.0, dtype=torch.float64)
  for sync_every in (1, 4):
    with pytest.raises(RuntimeError, match=r'fell below .* at t=0\.4999'):
      solvers.rk45(singular_at_half, x, t0=0.0, t1=1.0, sync_every=sync_every)
    with pytest.raises(RuntimeError, match=r'non-finite after t=0\.[0-4]'):
      solvers.rk45(not_finite_after_half, x, t0=0.0, t1=1.0, sync_every=sync_every)
  with pytest.raises(RuntimeError, match='did not reach t=1.0 within 3 attempted steps'):
    solvers.rk45(velocity_3t2x, x, t0=0.0, t1=1.0, rtol=1e-9, atol=1e-9, max_steps=3)


def test_encode_decode_round_trip():
  class Swirl(nn.Module):
    def forward(self, x, times):  # A smooth, non-linear, time-dependent field.
      rotation = torch.stack([-x[:, 1], x[:, 0]], dim=1)
      return rotation * (1 + times[:, None]) + 0.3 * torch.tanh(x)

  rf = RectifiedFlow(Swirl())
  data = torch.randn(16, 2, dtype=torch.float64)
  noise = rf.encode(data, solver='rk45', rtol=1e-9, atol=1e-9)
  assert (noise - data).abs().max() > 0.5  # The map really moves the points.
  torch.testing.assert_close(rf.decode(noise, solver='rk45', rtol=1e-9, atol=1e-9), data, atol=1e-6, rtol=0)


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match='valid solvers'):
    solvers.solve('rk4', velocity_3t2x, torch.zeros(1, 1), t0=0.0, t1=1.0, steps=1)
  with pytest.raises(ValueError, match='predict'):
    RectifiedFlow(nn.Identity(), predict='score')
  with pytest.raises(ValueError, match='time_distribution'):
    RectifiedFlow(nn.Identity(), time_distribution='beta')
  with pytest.raises(ValueError, match='perceptual_loss'):
    RectifiedFlow(nn.Identity(), loss='lpips_huber')


# ---------------------------------------------------------------------------------------------------------------
# Options: predictions, time distributions, losses.

class AffineOracle(nn.Module):
  """The exact X0, X1 and velocity of the straight coupling X1 = a X0 + b, in the requested parameterisation."""

  def __init__(self, a, b, predict):
    super().__init__()
    self.a, self.b, self.predict = a, b, predict

  def forward(self, x, times):
    t = flow_math.append_dims(times, x.dim())
    x0 = (x - t * self.b) / (1 - t + self.a * t)
    x1 = self.a * x0 + self.b
    return {'flow': x1 - x0, 'noise': x0, 'clean': x1}[self.predict]


@pytest.mark.parametrize('predict', ['flow', 'noise', 'clean'])
def test_each_prediction_has_zero_loss_at_its_oracle_and_the_same_velocity(predict):
  x0 = torch.randn(32, 5, dtype=torch.float64)
  b = torch.randn(1, 5, dtype=torch.float64)
  x1 = 1.5 * x0 + b
  rf = RectifiedFlow(AffineOracle(1.5, b, predict), predict=predict, time_eps=0.05)
  times = torch.rand(32, dtype=torch.float64) * 0.9 + 0.05
  assert rf(x1, noise=x0, times=times).item() < 1e-24
  x_t = flow_math.interpolate(x0, x1, times)
  torch.testing.assert_close(rf.velocity(x_t, times), x1 - x0)


def empirical_cdf_distance(samples, cdf, grid):
  empirical = (samples[None, :] <= grid[:, None]).double().mean(1)
  return (empirical - cdf(grid)).abs().max().item()


def numerical_cdf(density, grid, points=20001):
  t = torch.linspace(0, 1, points, dtype=torch.float64)
  pdf = density(t)
  cumulative = torch.cumulative_trapezoid(pdf, t)
  cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), cumulative]) / cumulative[-1]
  return torch.from_numpy(__import__('numpy').interp(grid.numpy(), t.numpy(), cumulative.numpy()))


@pytest.mark.parametrize('name,kwargs,cdf', [
    ('uniform', {}, lambda g: g),
    ('logit_normal', {'mean': 0.5, 'std': 0.8},
     lambda g: torch.distributions.Normal(0.5, 0.8).cdf(torch.logit(g.clamp(1e-12, 1 - 1e-12)))),
    ('u_shaped', {'a': 4.0}, lambda g: numerical_cdf(lambda t: torch.cosh(4.0 * (2 * t - 1)), g)),
    ('cosmap', {}, lambda g: numerical_cdf(lambda t: 2 / (math.pi * (1 - 2 * t + 2 * t ** 2)), g)),
])
def test_time_distributions_follow_their_densities(name, kwargs, cdf):
  samples = flow_math.sample_times(200_000, name, eps=0.0, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(0), **kwargs)
  assert samples.min() >= 0 and samples.max() <= 1
  grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
  assert empirical_cdf_distance(samples, cdf, grid) < 0.006


def test_time_eps_bounds_every_distribution():
  for name in flow_math.TIME_DISTRIBUTIONS:
    t = flow_math.sample_times(10_000, name, eps=0.1, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 0.1 and t.max() <= 1.0


def test_u_shaped_puts_more_mass_at_the_ends_than_uniform():
  t = flow_math.sample_times(100_000, 'u_shaped', eps=0.0, generator=torch.Generator().manual_seed(0))
  assert ((t < 0.1) | (t > 0.9)).float().mean() > 0.5


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
  d = 3 * 32 * 32
  c = flow_math.pseudo_huber_constant(d)
  assert c == pytest.approx(0.00054 * math.sqrt(d))
  target = torch.zeros(2, 3, 32, 32, dtype=torch.float64)
  small = torch.full_like(target, 1e-6)
  large = torch.full_like(target, 1.0)
  squared_norm = d * 1e-12
  torch.testing.assert_close(flow_math.per_sample_pseudo_huber(small, target),
                             torch.full((2,), squared_norm / (2 * c), dtype=torch.float64), rtol=1e-3, atol=0)
  torch.testing.assert_close(flow_math.per_sample_pseudo_huber(large, target),
                             torch.full((2,), math.sqrt(d) - c, dtype=torch.float64), rtol=1e-6, atol=0)


def test_pseudo_huber_loss_option_is_used():
  x0, x1 = torch.randn(4, 10), torch.randn(4, 10)
  times = torch.full((4,), 0.5)
  model = nn.Module()
  model.forward = lambda x, times: torch.zeros_like(x)
  rf = RectifiedFlow(model, loss='pseudo_huber')
  c = flow_math.pseudo_huber_constant(10)
  expected = (torch.sqrt((x1 - x0).square().sum(1) + c * c) - c).mean()
  torch.testing.assert_close(rf(x1, noise=x0, times=times), expected)


def test_lpips_huber_weights_the_data_end_and_uses_the_perceptual_distance():
  perceptual_calls = []

  def perceptual(estimate, data):
    perceptual_calls.append(1)
    return (estimate - data).abs().flatten(1).mean(1)

  velocity_error = 0.3
  x0 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
  x1 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
  model = nn.Module()
  model.forward = lambda x, times: (x1 - x0) + velocity_error  # The true velocity plus a constant error.
  rf = RectifiedFlow(model, loss='lpips_huber', perceptual_loss=perceptual)
  losses = {}
  for t in (0.2, 0.9):
    times = torch.full((2,), t, dtype=torch.float64)
    # X1_hat = X_t + (1 - t) v_hat misses X1 by (1 - t) * error; the 1 / (1 - t) weight undoes that shrinkage.
    error = (1 - t) * velocity_error
    c = flow_math.pseudo_huber_constant(3 * 8 * 8)
    expected = (math.sqrt(3 * 8 * 8 * error ** 2 + c * c) - c + error) / (1 - t)
    losses[t] = rf.per_sample_loss(x1, noise=x0, times=times)
    torch.testing.assert_close(losses[t], torch.full((2,), expected, dtype=torch.float64))
  assert perceptual_calls


# ---------------------------------------------------------------------------------------------------------------
# Closed forms of training.

class GaussianVelocityNet(nn.Module):
  """v(x, t) = k(t) x + m(t) with k, m small MLPs of t: the family that holds the exact Gaussian velocity."""

  def __init__(self, dim):
    super().__init__()
    self.k = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
    self.m = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, dim))

  def forward(self, x, times):
    t = times[:, None]
    return self.k(t) * x + self.m(t)


def test_gaussian_to_gaussian_training_approaches_the_exact_velocity():
  # X0 ~ N(0, I), X1 ~ N(mu, s^2 I) independent: X_t ~ N(t mu, (t^2 s^2 + (1 - t)^2) I) and
  # v*(x, t) = E[X1 - X0 | X_t = x] = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu).
  torch.manual_seed(0)
  mu, s = torch.tensor([2.0, -1.0]), 0.5
  rf = RectifiedFlow(GaussianVelocityNet(2), time_eps=0.0)
  optimizer = torch.optim.Adam(rf.parameters(), lr=3e-3)
  for _ in range(1500):
    optimizer.zero_grad()
    rf(mu + s * torch.randn(1024, 2)).backward()
    optimizer.step()

  def exact(x, t):
    k = (t * s ** 2 - (1 - t)) / (t ** 2 * s ** 2 + (1 - t) ** 2)
    return mu + k[:, None] * (x - t[:, None] * mu)

  t = torch.rand(4000) * 0.9 + 0.05
  x = t[:, None] * mu + torch.sqrt(t ** 2 * s ** 2 + (1 - t) ** 2)[:, None] * torch.randn(4000, 2)
  with torch.no_grad():
    error = (rf.velocity(x, t) - exact(x, t)).square().sum(1).mean().item()
    scale = exact(x, t).square().sum(1).mean().item()
  assert error < 0.01 * scale, (error, scale)


def test_one_reflow_straightens_a_2d_flow_and_shrinks_the_one_step_error():
  from examples import reflow_2d

  results, _ = reflow_2d.run(train_steps=500, reflow_steps=300, batch_size=256, seed=0, teacher_steps=20)
  _, straight1, one_step1, _ = results['1-rectified flow']
  _, straight2, one_step2, _ = results['2-rectified flow']
  assert straight2 < 0.25 * straight1, (straight1, straight2)
  assert one_step2 < 0.25 * one_step1, (one_step1, one_step2)


def test_the_readme_2d_example_writes_its_trajectory_png(tmp_path):
  from examples import reflow_2d

  results, x0 = reflow_2d.run(train_steps=50, reflow_steps=20, batch_size=128, teacher_steps=5)
  path = tmp_path / 'trajectories.png'
  reflow_2d.plot_trajectories(results, x0, str(path), shown=20, ode_steps=10)
  assert path.stat().st_size > 10_000
  from PIL import Image
  assert Image.open(path).size[0] > Image.open(path).size[1]  # Two panels side by side.


def test_the_flow_math_module_keeps_its_former_import_path():
  """``rectified_flow_pytorch.flow`` (the module's name before it became ``flow_math``) still imports, every way."""
  import rectified_flow_pytorch.flow as by_path
  from rectified_flow_pytorch.flow import sample_times

  from rectified_flow_pytorch import flow

  assert flow is flow_math and by_path is flow_math and sample_times is flow_math.sample_times
