"""Closed-form checks of the flow math, the solvers and the library wrapper."""
import pytest
import torch
from torch import nn

import evaluation
import losses
from configs.default_cifar10_configs import get_default_configs
from datasets import Batch
from models import ExponentialMovingAverage
from rectified_flow_pytorch import RectifiedFlow, flow_math, solvers


class AffineCouplingOracle(nn.Module):
  """The exact velocity of the straight coupling X1 = a X0 + b (a > 0) along X_t = t X1 + (1 - t) X0.

  X_t = (1 - t + a t) X0 + t b, so X0 = (X_t - t b) / (1 - t + a t) and v = X1 - X0 = (a - 1) X0 + b.
  """

  def __init__(self, a, b):
    super().__init__()
    self.a, self.b = a, b

  def forward(self, x, times):
    t = flow_math.append_dims(times, x.dim())
    x0 = (x - t * self.b) / (1 - t + self.a * t)
    return (self.a - 1) * x0 + self.b


def test_loss_is_zero_for_the_oracle_velocity_of_a_straight_coupling():
  x0 = torch.randn(16, 2, 4, 4, dtype=torch.float64)
  b = torch.randn(1, 2, 4, 4, dtype=torch.float64)
  x1 = 2.5 * x0 + b
  rf = RectifiedFlow(AffineCouplingOracle(2.5, b))
  assert rf(x1, noise=x0).item() < 1e-24
  # A wrong velocity has a clearly non-zero loss (the test can fail).
  rf_wrong = RectifiedFlow(AffineCouplingOracle(2.0, b))
  assert rf_wrong(x1, noise=x0).item() > 1e-2


class ConstantVelocity(nn.Module):
  """v(x, t) = c for every x and t, c a learnable (1, C, H, W) tensor: the loss of a pair then needs no time."""

  def __init__(self, c):
    super().__init__()
    self.c = nn.Parameter(c.clone())

  def forward(self, x, times):
    return self.c.expand_as(x)


# Sample b's velocity X1 - X0 differs from c by +-AMPLITUDES[b] in each pixel: its squared error is a_b^2 in every one
# of the PIXELS of a (2, 4, 4) sample, so the per-sample mean is a_b^2 and the sum PIXELS a_b^2.
AMPLITUDES = (0.5, 1.0, 2.0, 3.0)
PIXELS = 2 * 4 * 4
MEAN_OF_SQUARES = (0.25 + 1.0 + 4.0 + 9.0) / 4


def pairs_with_known_errors(c, dtype=torch.float64):
  """(x0, x1, signs): X1 = X0 + c + signs * a_b, with random X0 and random signs in {-1, 1}."""
  generator = torch.Generator().manual_seed(3)
  x0 = torch.randn(len(AMPLITUDES), *c.shape[1:], generator=generator, dtype=dtype)
  signs = torch.randint(0, 2, x0.shape, generator=generator).to(dtype) * 2 - 1
  amplitudes = torch.tensor(AMPLITUDES, dtype=dtype).reshape(-1, 1, 1, 1)
  return x0, x0 + c + signs * amplitudes, signs


def test_mse_loss_is_the_batch_mean_of_each_samples_pixel_mean_or_sum():
  c = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
  x0, x1, _ = pairs_with_known_errors(c)
  times = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
  published = RectifiedFlow(ConstantVelocity(c))  # loss_reduction='mean' by default, as published.
  torch.testing.assert_close(published.per_sample_loss(x1, noise=x0, times=times),
                             torch.tensor([a * a for a in AMPLITUDES], dtype=torch.float64))
  assert published(x1, noise=x0, times=times).item() == pytest.approx(MEAN_OF_SQUARES, rel=1e-12)
  summed = RectifiedFlow(ConstantVelocity(c), loss_reduction='sum')
  assert summed(x1, noise=x0, times=times).item() == pytest.approx(PIXELS * MEAN_OF_SQUARES, rel=1e-12)


@pytest.mark.parametrize('reduce_mean, per_pixel', [(True, 1 / PIXELS), (False, 1.0)], ids=['mean', 'sum'])
def test_the_training_steps_loss_and_gradient_follow_training_reduce_mean(reduce_mean, per_pixel):
  """One update of losses.get_step_fn on pairs (two micro-batches of 2): the loss it returns is
  mean_b mean_pixels (v - (X1 - X0))^2 with training.reduce_mean, mean_b sum_pixels without, and the gradient
  of c is that of the same loss: d/dc = 2 mean_b (c - (X1 - X0)) per_pixel = -2 mean_b (signs a_b) per_pixel."""
  config = get_default_configs()
  config.training.reduce_mean, config.training.precision = reduce_mean, 'fp32'
  config.training.batch_size, config.optim.grad_clip = len(AMPLITUDES), -1.0  # No clipping: the raw gradient.
  c = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
  net = ConstantVelocity(c)
  flow_ = losses.build_rectified_flow(config, net)
  params = list(net.parameters())
  step = losses.get_step_fn(config, losses.get_loss_fn(config, flow_), params, losses.get_optimizer(config, params),
                            ExponentialMovingAverage(params, decay=config.model.ema_rate), train=True,
                            generator=torch.Generator().manual_seed(0))
  x0, x1, signs = pairs_with_known_errors(c, torch.float32)
  micro_batches = [Batch(x0[:2], x1[:2], slice(0, 2)), Batch(x0[2:], x1[2:], slice(2, 4))]
  loss = step({'model': net, 'step': 0}, micro_batches)
  assert loss.item() == pytest.approx(MEAN_OF_SQUARES * PIXELS * per_pixel, rel=1e-5)
  amplitudes = torch.tensor(AMPLITUDES).reshape(-1, 1, 1, 1)
  torch.testing.assert_close(net.c.grad, -2 * (signs * amplitudes).mean(0, keepdim=True) * per_pixel)


def test_interpolation_and_target_match_eq_1():
  x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
  t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
  xt = flow_math.interpolate(x0, x1, t)
  torch.testing.assert_close(xt[0], x0[0])
  torch.testing.assert_close(xt[-1], x1[-1])
  torch.testing.assert_close(xt[1], 0.25 * x1[1] + 0.75 * x0[1])
  torch.testing.assert_close(flow_math.velocity_target(x0, x1), x1 - x0)


def test_training_times_are_uniform_on_eps_to_one():
  t = flow_math.sample_times(100_000, 'uniform', eps=1e-3, generator=torch.Generator().manual_seed(0))
  assert t.min() >= 1e-3 and t.max() <= 1.0
  assert abs(t.mean().item() - (1 + 1e-3) / 2) < 5e-3


@pytest.mark.parametrize('eps', [0.0, 1e-3])
def test_one_euler_step_is_exact_for_a_constant_velocity(eps):
  c = torch.randn(4, 3, 8, 8)
  x0 = torch.randn(4, 3, 8, 8)
  x1, nfe = solvers.euler(lambda x, t: c, x0, steps=1, t0=eps, step_size=1.0)
  assert nfe == 1
  torch.testing.assert_close(x1, x0 + c, atol=0, rtol=0)


def test_euler_on_a_linear_field_matches_its_closed_form():
  # dx/dt = x with N Euler steps of 1/N: x1 = (1 + 1/N)^N x0.
  x0 = torch.randn(3, 5, dtype=torch.float64)
  x1, nfe = solvers.euler(lambda x, t: x, x0, steps=10)
  assert nfe == 10
  torch.testing.assert_close(x1, (1 + 1 / 10) ** 10 * x0)


def test_rk45_integrates_a_time_dependent_field_to_tolerance():
  # dx/dt = 3 t^2 x from t0 = 0.001 to 1: x1 = x0 exp(1 - t0^3).
  x0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
  x1, nfe = solvers.rk45(lambda x, t: 3 * flow_math.append_dims(t, x.dim()) ** 2 * x, x0, t0=1e-3, t1=1.0,
                         rtol=1e-8, atol=1e-8)
  torch.testing.assert_close(x1, x0 * torch.exp(torch.tensor(1 - 1e-9, dtype=torch.float64)), atol=1e-6, rtol=1e-6)
  assert 8 < nfe < 500


def test_rk45_is_exact_on_a_constant_field_in_few_evaluations():
  c = torch.randn(4, 6)
  x0 = torch.randn(4, 6)
  x1, nfe = solvers.rk45(lambda x, t: c.expand_as(x), x0, t0=0.0, t1=1.0)
  torch.testing.assert_close(x1, x0 + c, atol=1e-6, rtol=1e-6)
  assert nfe <= 2 + 6 * 3


def test_straightness_is_zero_for_straight_and_known_for_curved_flows():
  x0 = torch.randn(8, 4, dtype=torch.float64)
  c = torch.randn(8, 4, dtype=torch.float64)
  straight = evaluation.straightness(lambda x, t: c, x0, steps=50)
  torch.testing.assert_close(straight, torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
  # v = 2 t c: Z1 - Z0 = c and S = E_t ||c - 2 t c||^2 / d = |c|^2 / (3 d) in the continuum.
  curved = evaluation.straightness(lambda x, t: 2 * t[:, None] * c, x0, steps=2000)
  torch.testing.assert_close(curved, c.square().mean(1) / 3, rtol=2e-3, atol=0)



def test_sample_without_a_known_shape_is_a_clear_error():
  rf = RectifiedFlow(nn.Conv2d(3, 3, 1), time_cond_kwarg=None)
  with pytest.raises(ValueError, match='data shape is unknown'):
    rf.sample()
