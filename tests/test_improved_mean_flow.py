"""ImprovedMeanFlow (iMF: MeanFlow's identity differentiated along the network's own velocity) against the closed form
of tests/gaussian_flow.py, central finite differences, MeanFlow's target, and a training run on the Gaussian."""
import pytest
import torch

from rectified_flow_pytorch import ImprovedMeanFlow, MeanFlow, RectifiedFlow, flow_math
from tests.gaussian_flow import (
  GaussianAverageVelocity,
  RecordingModel,
  TinyAverageVelocityNet,
  TinyConvNet,
  assert_it_samples_the_gaussian,
  assert_the_gradient_is_that_of_the_weighted_regression,
  points_on_the_path,
  posterior_mean_pair,
  start_and_end_times,
  train_on_the_gaussian,
)


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
  assert_the_gradient_is_that_of_the_weighted_regression(ImprovedMeanFlow(make_model().double(), interval_fraction=1.0),
                                                         data_shape)


def test_training_from_scratch_samples_the_gaussian_in_one_step():
  """iMF's 1- and 2-step samples of N(mu, sigma^2) after 1500 updates match its mean (to a tenth of sigma) and
  spread (one Euler step of the exact rectified-flow velocity would put every sample on the mean)."""
  flow = train_on_the_gaussian(ImprovedMeanFlow, adaptive_weight_power=0.0)
  assert_it_samples_the_gaussian(flow)
