"""SplitMeanFlow (a MeanFlow trained by interval splitting, no forward mode) against the closed form of
tests/test_mean_flow.py (Gaussian noise to independent Gaussian data) and against MeanFlow's forward-mode target."""
import pytest
import torch
from torch import nn

from rectified_flow_pytorch import MeanFlow, RectifiedFlow, SplitMeanFlow
from tests.gaussian_flow import (
  MU,
  SIGMA,
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


def points_and_fractions(batch, seed):
  generator, t, s, x_t = points_on_the_path(batch, seed)
  return generator, t, s, x_t, torch.rand(batch, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize('split_point', ['uniform', 'midpoint'])
def test_the_exact_average_velocity_is_its_own_split_target(split_point):
  """Average velocities add over the two parts of an interval, so the exact u is its own target wherever it is
  split, with no conditional-velocity noise in it; an instantaneous velocity in its place is not."""
  _, t, s, x_t, fractions = points_and_fractions(64, seed=1)
  flow = SplitMeanFlow(GaussianAverageVelocity(), split_point=split_point)
  x0, x1 = posterior_mean_pair(x_t, t)
  if split_point == 'midpoint':
    fractions = flow.sample_split_fractions(64, dtype=torch.float64)
    assert torch.equal(fractions, torch.full((64,), 0.5, dtype=torch.float64))
  prediction, target = flow.average_velocity_and_target(x_t, t, s, x1 - x0, split_fractions=fractions)
  torch.testing.assert_close(target, prediction, rtol=0, atol=1e-12)
  assert flow.per_sample_loss(x1, noise=x0, times=t, end_times=s, split_fractions=fractions).max() < 1e-20
  # A random pair (not the posterior mean) changes MeanFlow's target but not this one on an interval.
  noisy = torch.randn_like(x_t)
  _, target_noisy = flow.average_velocity_and_target(x_t, t, s, noisy, split_fractions=fractions)
  torch.testing.assert_close(target_noisy, prediction, rtol=0, atol=1e-12)
  wrong = SplitMeanFlow(GaussianAverageVelocity(instantaneous_only=True), split_point=split_point)
  prediction, target = wrong.average_velocity_and_target(x_t, t, s, x1 - x0, split_fractions=fractions)
  assert (target - prediction).abs().max() > 0.1


@pytest.mark.parametrize('data_shape', [(5,), (2, 3, 3)])
def test_the_split_target_tends_to_the_forward_mode_target_as_the_split_point_nears_the_start(data_shape):
  """target(lam) = u + lam (MeanFlow's target with the tangent u_theta(z, t, t) - u) + O(lam^2): the slope at
  lam = 0 (second-order one-sided differences) is MeanFlow's forward-mode residual, on any network."""
  generator = torch.Generator().manual_seed(2)
  model = TinyAverageVelocityNet(data_shape).double()
  split, jvp = SplitMeanFlow(model), MeanFlow(model)
  t, s = start_and_end_times(8, generator)
  x_t = torch.randn(8, *data_shape, dtype=torch.float64, generator=generator)
  own_velocity = model(x_t, t, end_times=t).detach()

  def target(fraction):
    return split.average_velocity_and_target(x_t, t, s, torch.zeros_like(x_t),
                                             split_fractions=torch.full_like(t, fraction))[1]

  step = 1e-4
  prediction = target(0.0)
  torch.testing.assert_close(prediction, model(x_t, t, end_times=s), rtol=0, atol=1e-14)  # target(0) = u.
  slope = (-3.0 * prediction + 4.0 * target(step) - target(2.0 * step)) / (2.0 * step)
  _, jvp_target = jvp.average_velocity_and_target(x_t, t, s, own_velocity)
  torch.testing.assert_close(slope, jvp_target - prediction, rtol=0, atol=1e-6)
  assert (jvp_target - prediction).abs().max() > 1e-2  # A slope worth comparing.


def test_the_target_takes_two_gradient_free_evaluations_on_the_two_parts_then_the_prediction():
  recorder = RecordingModel(TinyAverageVelocityNet((4,), num_classes=3).double())
  flow = SplitMeanFlow(recorder, num_classes=3)
  _, t, s, _, fractions = points_and_fractions(6, seed=3)
  x_t, labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0])
  prediction, target = flow.average_velocity_and_target(x_t, t, s, torch.zeros_like(x_t), labels=labels,
                                                        split_fractions=fractions)
  middle = t + fractions * (s - t)
  assert len(recorder.calls) == 3
  for (times, end_times, call_labels), (start, end) in zip(recorder.calls, [(t, middle), (middle, s), (t, s)]):
    torch.testing.assert_close(times, start, rtol=0, atol=0)
    torch.testing.assert_close(end_times, end, rtol=0, atol=0)
    assert torch.equal(call_labels, labels)
  assert prediction.requires_grad and not target.requires_grad
  with torch.no_grad():
    first = recorder.model(x_t, t, labels=labels, end_times=middle)
    second = recorder.model(x_t + (middle - t)[:, None] * first, middle, labels=labels, end_times=s)
  torch.testing.assert_close(target, fractions[:, None] * first + (1 - fractions[:, None]) * second,
                             rtol=1e-14, atol=0)


def test_without_intervals_the_loss_is_the_rectified_flow_loss():
  model = TinyAverageVelocityNet((4,)).double()
  data, noise = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
  flow = SplitMeanFlow(model, interval_fraction=0.0, adaptive_weight_power=0.0, loss_reduction='mean')
  times = flow.sample_training_times(16, dtype=torch.float64)
  assert torch.equal(times['times'], times['end_times']) and set(times) == {'times', 'end_times', 'split_fractions'}
  expected = RectifiedFlow(model).per_sample_loss(data, noise=noise, times=times['times'])
  torch.testing.assert_close(flow.per_sample_loss(data, noise=noise, **times), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize('make_model,data_shape', [
    (lambda: TinyAverageVelocityNet((6,)), (6,)),
    (lambda: TinyConvNet(3), (3, 5, 4)),
])
def test_the_gradient_reaches_the_model_through_the_prediction_only(make_model, data_shape):
  flow = SplitMeanFlow(make_model().double(), interval_fraction=1.0, adaptive_weight_power=1.0)
  assert_the_gradient_is_that_of_the_weighted_regression(flow, data_shape)


def test_split_fractions_are_uniform_and_an_unknown_split_point_is_a_clear_error():
  generator = torch.Generator().manual_seed(5)
  count = 40000
  fractions = SplitMeanFlow(nn.Identity()).sample_split_fractions(count, dtype=torch.float64, generator=generator)
  empirical = torch.arange(1, count + 1, dtype=torch.float64) / count
  assert float((empirical - fractions.sort().values).abs().max()) < 1.95 / count ** 0.5  # KS at 0.1%.
  with pytest.raises(ValueError, match=r"split_point='half'.*\['uniform', 'midpoint'\]"):
    SplitMeanFlow(nn.Identity(), split_point='half')


def test_training_from_scratch_samples_the_gaussian_in_one_step():
  """SplitMeanFlow's 1- and 2-step samples of N(mu, sigma^2) after 1500 updates (its default weight, p = 0) match
  its mean (to a tenth of sigma) and spread (one Euler step of the exact rectified-flow velocity, x0 + v(x0, 0) = mu,
  would put every sample on the mean)."""
  flow = train_on_the_gaussian(SplitMeanFlow)
  assert flow.adaptive_weight_power == 0.0
  assert_it_samples_the_gaussian(flow)


def test_with_meanflows_adaptive_weight_the_same_training_misses_the_gaussian():
  """Why the default weight is p = 0: with MeanFlow's CIFAR-10 weight (p = 0.75) the interval targets, free of the
  pair's noise, outweigh the s = t samples and the same run no longer samples the Gaussian."""
  flow = train_on_the_gaussian(SplitMeanFlow, adaptive_weight_power=0.75)
  samples = flow.sample(noise=torch.randn(20000, 3, dtype=torch.float64), steps=1)
  assert not torch.isfinite(samples).all() or ((samples.mean(0) - MU).abs() > SIGMA).any()
