"""ImprovedMeanFlow (iMF: MeanFlow's identity differentiated along the network's own velocity) against the closed form
of tests/gaussian_flow.py, central finite differences, MeanFlow's target, and a training run on the Gaussian."""
import pytest
import torch

from rectified_flow_pytorch import ImprovedMeanFlow, MeanFlow, RectifiedFlow, flow_math
from tests.gaussian_flow import (
  MU,
  SIGMA,
  GaussianAverageVelocity,
  RecordingModel,
  TinyAverageVelocityNet,
  TinyConvNet,
  gaussian_std,
  posterior_mean_pair,
  start_and_end_times,
)


def points_on_the_path(batch, seed):
  generator = torch.Generator().manual_seed(seed)
  t, s = start_and_end_times(batch, generator)
  x_t = t[:, None] * MU + gaussian_std(t) * torch.randn(batch, 3, dtype=torch.float64, generator=generator)
  return generator, t, s, x_t


def test_the_exact_average_velocity_is_its_own_target_and_the_pair_enters_it_only_additively():
  """With the exact u, the tangent u(z, t, t) is the marginal velocity, so the target is u for the posterior-mean
  pair; another pair's velocity v' moves the target by exactly v' - v (no Jacobian of the network acts on the
  pair's noise), where MeanFlow's target moves by more."""
  generator, t, s, x_t = points_on_the_path(64, seed=1)
  flow = ImprovedMeanFlow(GaussianAverageVelocity())
  x0, x1 = posterior_mean_pair(x_t, t)
  prediction, target = flow.average_velocity_and_target(x_t, t, s, x1 - x0)
  torch.testing.assert_close(target, prediction, rtol=0, atol=1e-12)
  assert flow.per_sample_loss(x1, noise=x0, times=t, end_times=s).max() < 1e-20
  other = torch.randn(64, 3, dtype=torch.float64, generator=generator)
  _, moved = flow.average_velocity_and_target(x_t, t, s, other)
  torch.testing.assert_close(moved - target, other - (x1 - x0), rtol=0, atol=1e-12)
  _, mean_flow_moved = MeanFlow(GaussianAverageVelocity()).average_velocity_and_target(x_t, t, s, other)
  assert (mean_flow_moved - moved).abs().max() > 0.1
  wrong = ImprovedMeanFlow(GaussianAverageVelocity(instantaneous_only=True))
  prediction, target = wrong.average_velocity_and_target(x_t, t, s, x1 - x0)
  assert (target - prediction).abs().max() > 0.1


@pytest.mark.parametrize('data_shape', [(5,), (2, 3, 3)])
def test_the_target_equals_central_finite_differences_along_the_networks_own_velocity(data_shape):
  """target = v + (s - t) (u(z + h v_theta, t + h, s) - u(z - h v_theta, t - h, s)) / 2h, v_theta = u(z, t, t), on
  any network; it is MeanFlow's target given v_theta as the tangent (and v added), not the pair's velocity."""
  generator = torch.Generator().manual_seed(2)
  model = TinyAverageVelocityNet(data_shape).double()
  flow = ImprovedMeanFlow(model)
  t, s = start_and_end_times(8, generator)
  x_t = torch.randn(8, *data_shape, dtype=torch.float64, generator=generator)
  velocity = torch.randn(8, *data_shape, dtype=torch.float64, generator=generator)
  _, target = flow.average_velocity_and_target(x_t, t, s, velocity)
  step, interval = 1e-6, flow_math.append_dims(s - t, x_t.dim())
  with torch.no_grad():
    tangent = model(x_t, t, end_times=t)
    slope = (model(x_t + step * tangent, t + step, end_times=s) -
             model(x_t - step * tangent, t - step, end_times=s)) / (2.0 * step)
  torch.testing.assert_close(target, velocity + interval * slope, rtol=0, atol=1e-7)
  _, along_the_pair = MeanFlow(model).average_velocity_and_target(x_t, t, s, velocity)
  assert (along_the_pair - target).abs().max() > 1e-3  # The tangent matters here.


def test_the_target_takes_the_velocity_without_gradient_first_then_the_prediction():
  recorder = RecordingModel(TinyAverageVelocityNet((4,), num_classes=3).double())
  flow = ImprovedMeanFlow(recorder, num_classes=3)
  _, t, s, _ = points_on_the_path(6, seed=3)
  x_t, labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0])
  prediction, target = flow.average_velocity_and_target(x_t, t, s, torch.zeros_like(x_t), labels=labels)
  assert len(recorder.calls) == 2
  for (times, end_times, call_labels), (start, end) in zip(recorder.calls, [(t, t), (t, s)]):
    torch.testing.assert_close(forward_primal(times), start, rtol=0, atol=0)
    torch.testing.assert_close(end_times, end, rtol=0, atol=0)
    assert torch.equal(call_labels, labels)
  assert prediction.requires_grad and not target.requires_grad


def forward_primal(tensor):
  return torch.autograd.forward_ad.unpack_dual(tensor).primal


def test_without_intervals_the_loss_is_the_rectified_flow_loss():
  model = TinyAverageVelocityNet((4,)).double()
  data, noise = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
  flow = ImprovedMeanFlow(model, interval_fraction=0.0, adaptive_weight_power=0.0, loss_reduction='mean')
  times = flow.sample_training_times(16, dtype=torch.float64)
  assert torch.equal(times['times'], times['end_times'])
  expected = RectifiedFlow(model).per_sample_loss(data, noise=noise, times=times['times'])
  torch.testing.assert_close(flow.per_sample_loss(data, noise=noise, **times), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize('make_model,data_shape', [
    (lambda: TinyAverageVelocityNet((6,)), (6,)),
    (lambda: TinyConvNet(3), (3, 5, 4)),
])
def test_the_gradient_reaches_the_model_through_the_prediction_only(make_model, data_shape):
  model = make_model().double()
  flow = ImprovedMeanFlow(model, interval_fraction=1.0)
  data, noise = torch.randn(6, *data_shape, dtype=torch.float64), torch.randn(6, *data_shape, dtype=torch.float64)
  times = flow.sample_training_times(6, dtype=torch.float64)
  flow(data, noise=noise, **times).backward()
  gradients = [parameter.grad.clone() for parameter in model.parameters()]
  assert all(gradient.abs().sum() > 0 for gradient in gradients)
  model.zero_grad()
  x_t = flow_math.interpolate(noise, data, times['times'])
  _, target = flow.average_velocity_and_target(x_t, times['times'], times['end_times'], data - noise)
  squared = (model(x_t, times['times'], end_times=times['end_times']) - target).square().flatten(1).sum(dim=1)
  (squared / (squared.detach() + 1e-3)).mean().backward()
  for gradient, parameter in zip(gradients, model.parameters()):
    torch.testing.assert_close(gradient, parameter.grad, rtol=1e-10, atol=1e-12)


class AffineAverageVelocity(torch.nn.Module):
  """u(z, t, s) = a(t, s) + b(t, s) z per coordinate, a and b small MLPs of (t, s): the family of the exact answer."""

  def __init__(self, hidden=32):
    super().__init__()
    self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                   torch.nn.SiLU(), torch.nn.Linear(hidden, 6))

  def forward(self, x, times, labels=None, end_times=None):
    a, b = self.net(torch.stack([times, end_times], dim=1)).chunk(2, dim=1)
    return a + b * x


def test_training_from_scratch_samples_the_gaussian_in_one_step():
  """iMF's 1- and 2-step samples of N(mu, sigma^2) after 1500 updates match its mean (to a tenth of sigma) and
  spread (one Euler step of the exact rectified-flow velocity would put every sample on the mean)."""
  torch.manual_seed(0)
  model = AffineAverageVelocity().double()
  flow = ImprovedMeanFlow(model, interval_fraction=0.75, time_distribution='uniform', adaptive_weight_power=0.0)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1500)
  for _ in range(1500):
    data = MU + SIGMA * torch.randn(256, 3, dtype=torch.float64)
    optimizer.zero_grad()
    flow(data).backward()
    optimizer.step()
    schedule.step()
  for steps in (1, 2):
    samples = flow.sample(noise=torch.randn(20000, 3, dtype=torch.float64), steps=steps)
    assert ((samples.mean(0) - MU).abs() < 0.1 * SIGMA).all()
    torch.testing.assert_close(samples.std(0), SIGMA, rtol=0.1, atol=0)
