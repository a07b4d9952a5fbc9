"""Closed-form checks of the flow math, the solvers and the library wrapper."""
import pytest
import torch
from torch import nn

import evaluation
from rectified_flow_pytorch import RectifiedFlow, flow, solvers


class AffineCouplingOracle(nn.Module):
  """The exact velocity of the straight coupling X1 = a X0 + b (a > 0) along X_t = t X1 + (1 - t) X0.

  X_t = (1 - t + a t) X0 + t b, so X0 = (X_t - t b) / (1 - t + a t) and v = X1 - X0 = (a - 1) X0 + b.
  """

  def __init__(self, a, b):
    super().__init__()
    self.a, self.b = a, b

  def forward(self, x, times):
    t = flow.append_dims(times, x.dim())
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


def test_interpolation_and_target_match_eq_1():
  x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
  t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
  xt = flow.interpolate(x0, x1, t)
  torch.testing.assert_close(xt[0], x0[0])
  torch.testing.assert_close(xt[-1], x1[-1])
  torch.testing.assert_close(xt[1], 0.25 * x1[1] + 0.75 * x0[1])
  torch.testing.assert_close(flow.velocity_target(x0, x1), x1 - x0)


def test_training_times_are_uniform_on_eps_to_one():
  t = flow.sample_times(100_000, 'uniform', eps=1e-3, generator=torch.Generator().manual_seed(0))
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
  x1, nfe = solvers.rk45(lambda x, t: 3 * flow.append_dims(t, x.dim()) ** 2 * x, x0, t0=1e-3, t1=1.0,
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
