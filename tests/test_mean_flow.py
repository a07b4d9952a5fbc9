"""MeanFlow (Geng et al. 2025) in this library's convention (t = 0 noise, t = 1 data), against closed forms.

The closed form: X0 ~ N(0, I) and X1 ~ N(mu, diag(sigma^2)) drawn independently. X_t = (1 - t) X0 + t X1 is
N(m(t), S(t)^2) per coordinate with m(t) = t mu and S(t)^2 = (1 - t)^2 + t^2 sigma^2, and the rectified flow's
marginal velocity E[X1 - X0 | X_t] moves each quantile along z_s = m(s) + S(s) / S(t) (z_t - m(t)). Its average
velocity (z_s - z_t) / (s - t) is, with S(s)^2 - S(t)^2 = (s - t) ((s + t)(1 + sigma^2) - 2),
    u(z, t, s) = mu + ((s + t)(1 + sigma^2) - 2) / (S(t) (S(s) + S(t))) (z - m(t)),
smooth through s = t, where it is the instantaneous velocity.
"""
import math

import pytest
import torch
from torch import nn

from rectified_flow_pytorch import MeanFlow, RectifiedFlow, flow_math
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


def finite_difference_target(network, x_t, t, s, velocity, step=1e-6):
  """v + (s - t) d/dt u with d/dt u by central differences of u along (v, 1, 0)."""
  forward = network(x_t + step * velocity, t + step, s)
  backward = network(x_t - step * velocity, t - step, s)
  return velocity + flow_math.append_dims(s - t, x_t.dim()) * (forward - backward) / (2.0 * step)


# ---------------------------------------------------------------------------------------------------------------
# 1. The closed form: the exact average velocity satisfies the identity and samples exactly.

def test_the_exact_average_velocity_is_its_own_target():
  generator = torch.Generator().manual_seed(1)
  t, s = start_and_end_times(64, generator)
  x_t = t[:, None] * MU + gaussian_std(t) * torch.randn(64, 3, dtype=torch.float64, generator=generator)
  x0, x1 = posterior_mean_pair(x_t, t)
  torch.testing.assert_close(flow_math.interpolate(x0, x1, t), x_t, rtol=0, atol=1e-12)
  mean_flow = MeanFlow(GaussianAverageVelocity())
  # The target is affine in the velocity, so E[target | X_t] is the target at E[X1 - X0 | X_t] = v(X_t, t): for the
  # posterior-mean pair the identity u = v + (s - t) du/dt must hold exactly at the exact u.
  prediction, target = mean_flow.average_velocity_and_target(x_t, t, s, x1 - x0)
  torch.testing.assert_close(target, prediction, rtol=0, atol=1e-10)
  assert mean_flow.per_sample_loss(x1, noise=x0, times=t, end_times=s).max() < 1e-15
  # The instantaneous velocity is not an average velocity over an interval: its target differs.
  wrong = MeanFlow(GaussianAverageVelocity(instantaneous_only=True))
  prediction, target = wrong.average_velocity_and_target(x_t, t, s, x1 - x0)
  assert (target - prediction).abs().max() > 0.1


@pytest.mark.parametrize('steps', [1, 2, 5])
def test_sampling_the_exact_average_velocity_lands_on_the_flow_end_point(steps):
  noise = torch.randn(32, 3, dtype=torch.float64)
  mean_flow = MeanFlow(GaussianAverageVelocity())
  samples = mean_flow.sample(noise=noise, steps=steps)
  # The flow from t = 0 to t = 1 is z1 = m(1) + S(1) / S(0) (z0 - m(0)) = mu + sigma z0.
  torch.testing.assert_close(samples, MU + SIGMA * noise, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 2. The forward-mode target against finite differences.

@pytest.mark.parametrize('data_shape', [(5,), (2, 3, 3)])
def test_the_jvp_target_equals_central_finite_differences(data_shape):
  generator = torch.Generator().manual_seed(2)
  model = TinyAverageVelocityNet(data_shape).double()
  mean_flow = MeanFlow(model)
  t, s = start_and_end_times(8, generator)
  x_t = torch.randn(8, *data_shape, dtype=torch.float64, generator=generator)
  velocity = torch.randn(8, *data_shape, dtype=torch.float64, generator=generator)
  _, target = mean_flow.average_velocity_and_target(x_t, t, s, velocity)
  with torch.no_grad():
    expected = finite_difference_target(lambda z, a, b: model(z, a, end_times=b), x_t, t, s, velocity)
  torch.testing.assert_close(target, expected, rtol=0, atol=1e-7)
  assert (target - velocity).abs().max() > 1e-3  # The (s - t) du/dt term is not negligible here.


def test_the_target_terms_are_central_finite_differences_through_the_image_and_the_time_and_sum_to_the_target():
  generator = torch.Generator().manual_seed(4)
  model = TinyAverageVelocityNet((2, 3, 3)).double()
  mean_flow = MeanFlow(model)
  t, s = start_and_end_times(8, generator)
  x_t = torch.randn(8, 2, 3, 3, dtype=torch.float64, generator=generator)
  velocity = torch.randn(8, 2, 3, 3, dtype=torch.float64, generator=generator)
  terms = mean_flow.target_terms(x_t, t, s, velocity)
  prediction, target = mean_flow.average_velocity_and_target(x_t, t, s, velocity)
  torch.testing.assert_close(terms['velocity'] + terms['spatial'] + terms['temporal'], target, rtol=0, atol=1e-12)
  torch.testing.assert_close(terms['prediction'], prediction.detach(), rtol=0, atol=0)
  step, interval = 1e-6, flow_math.append_dims(s - t, 4)
  with torch.no_grad():
    spatial = (model(x_t + step * velocity, t, end_times=s) - model(x_t - step * velocity, t, end_times=s)) / (2 * step)
    temporal = (model(x_t, t + step, end_times=s) - model(x_t, t - step, end_times=s)) / (2 * step)
  torch.testing.assert_close(terms['spatial'], interval * spatial, rtol=0, atol=1e-7)
  torch.testing.assert_close(terms['temporal'], interval * temporal, rtol=0, atol=1e-7)
  assert min(terms['spatial'].abs().max(), terms['temporal'].abs().max()) > 1e-3  # Both worth comparing.


# ---------------------------------------------------------------------------------------------------------------
# 3. Without intervals (s = t) the loss is the rectified flow's.

def test_without_intervals_the_loss_is_the_rectified_flow_loss():
  model = TinyAverageVelocityNet((4,)).double()
  data, noise = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
  mean_flow = MeanFlow(model, interval_fraction=0.0, adaptive_weight_power=0.0, loss_reduction='mean')
  times, end_times = mean_flow.sample_time_pairs(16, dtype=torch.float64)
  assert torch.equal(times, end_times)
  rectified_flow = RectifiedFlow(model)
  expected = rectified_flow.per_sample_loss(data, noise=noise, times=times)
  torch.testing.assert_close(mean_flow.per_sample_loss(data, noise=noise, times=times, end_times=end_times), expected,
                             rtol=1e-14, atol=0)
  # The paper's weighting on the squared norm: ||delta||^2 / (||delta||^2 + c) with p = 1.
  weighted = MeanFlow(model, interval_fraction=0.0, adaptive_weight_constant=1e-3)
  squared = RectifiedFlow(model, loss_reduction='sum').per_sample_loss(data, noise=noise, times=times)
  torch.testing.assert_close(weighted.per_sample_loss(data, noise=noise, times=times, end_times=times),
                             squared / (squared + 1e-3), rtol=1e-14, atol=0)


def test_time_pairs_follow_the_logit_normal_and_the_interval_fraction():
  generator = torch.Generator().manual_seed(3)
  count = 40000
  times, end_times = MeanFlow(nn.Identity(), interval_fraction=1.0).sample_time_pairs(
      count, dtype=torch.float64, generator=generator)
  assert (times <= end_times).all() and (times > 0).all() and (end_times < 1).all()
  # With intervals everywhere the pairs are the two draws themselves: logit(t) ~ N(0.4, 1), the paper's
  # lognorm(-0.4, 1.0) with time reversed.
  logits = torch.logit(torch.cat([times, end_times]))
  assert abs(float(logits.mean()) - 0.4) < 4 / (2 * count) ** 0.5
  assert abs(float(logits.std()) - 1.0) < 0.02
  assert abs(float(torch.logit(times).mean()) - (0.4 - 1 / math.sqrt(math.pi))) < 0.02  # t is the earlier draw.
  times, end_times = MeanFlow(nn.Identity()).sample_time_pairs(count, dtype=torch.float64, generator=generator)
  intervals = float((end_times > times).double().mean())
  assert abs(intervals - 0.25) < 4 * (0.25 * 0.75 / count) ** 0.5


def logit_normal_cdf(values, mean, std=1.6):
  normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
  return normal.cdf((torch.logit(values) - mean) / std)


def ks_distance(values, expected_cdf):
  """The Kolmogorov-Smirnov distance of a sample from a CDF; below 1.95 / sqrt(n) at the 0.1% level."""
  values = values.sort().values
  empirical = torch.arange(1, len(values) + 1, dtype=torch.float64) / len(values)
  return float((empirical - expected_cdf(values)).abs().max())


def test_time_pairs_of_two_distributions_are_the_min_and_max_of_one_draw_of_each():
  """t ~ logit-normal(0.6, 1.6) and s ~ logit-normal(4, 1.6) drawn independently, t the earlier: the end times have
  the CDF F_t F_s of the maximum and the start times 1 - (1 - F_t)(1 - F_s) of the minimum (Kolmogorov-Smirnov)."""
  generator = torch.Generator().manual_seed(4)
  count = 40000
  flow = MeanFlow(nn.Identity(), interval_fraction=1.0, time_distribution_kwargs={'mean': 0.6, 'std': 1.6},
                  end_time_distribution_kwargs={'mean': 4.0, 'std': 1.6})
  times, end_times = flow.sample_time_pairs(count, dtype=torch.float64, generator=generator)
  assert (times <= end_times).all()
  bound = 1.95 / count ** 0.5  # The KS critical value at 0.1%.
  start, end = (lambda v: logit_normal_cdf(v, 0.6)), (lambda v: logit_normal_cdf(v, 4.0))
  assert ks_distance(end_times, lambda v: start(v) * end(v)) < bound
  assert ks_distance(times, lambda v: 1 - (1 - start(v)) * (1 - end(v))) < bound
  same = MeanFlow(nn.Identity(), interval_fraction=1.0, time_distribution_kwargs={'mean': 0.6, 'std': 1.6})
  assert same.end_time_distribution_kwargs == {'mean': 0.6, 'std': 1.6}  # Without the setting: one distribution.


def test_a_uniform_pair_fraction_mixes_uniform_pairs_into_the_sampler():
  """With probability 1/2 a pair's two draws are uniform instead: the end times have the CDF of the mixture
  (F_t F_s + v^2) / 2 and the start times (1 - (1 - F_t)(1 - F_s) + 1 - (1 - v)^2) / 2 (Kolmogorov-Smirnov); the
  sampler's random stream without the part is unchanged."""
  count = 40000
  kwargs = dict(interval_fraction=1.0, time_distribution_kwargs={'mean': 0.6, 'std': 1.6},
                end_time_distribution_kwargs={'mean': 4.0, 'std': 1.6})
  flow = MeanFlow(nn.Identity(), uniform_pair_fraction=0.5, **kwargs)
  times, end_times = flow.sample_time_pairs(count, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
  assert (times <= end_times).all()
  bound = 1.95 / count ** 0.5
  start, end = (lambda v: logit_normal_cdf(v, 0.6)), (lambda v: logit_normal_cdf(v, 4.0))
  assert ks_distance(end_times, lambda v: (start(v) * end(v) + v ** 2) / 2) < bound
  assert ks_distance(times, lambda v: (2 - (1 - start(v)) * (1 - end(v)) - (1 - v) ** 2) / 2) < bound
  generator = torch.Generator().manual_seed(6)
  plain = MeanFlow(nn.Identity(), **{**kwargs, 'interval_fraction': 0.5}).sample_time_pairs(
      64, dtype=torch.float64, generator=generator)
  generator.manual_seed(6)
  draws = [flow_math.sample_times(64, 'logit_normal', eps=0.0, dtype=torch.float64, generator=generator, mean=mean,
                                  std=1.6) for mean in (0.6, 4.0)]
  intervals = torch.rand(64, generator=generator) < 0.5
  assert torch.equal(plain[0], torch.minimum(*draws))
  assert torch.equal(plain[1], torch.where(intervals, torch.maximum(*draws), torch.minimum(*draws)))
  with pytest.raises(ValueError, match='uniform_pair_fraction must be in'):
    MeanFlow(nn.Identity(), uniform_pair_fraction=1.5)


# ---------------------------------------------------------------------------------------------------------------
# 4. Any data shape; the gradient flows through the prediction only.

@pytest.mark.parametrize('make_model,data_shape', [
    (lambda: TinyAverageVelocityNet((6,)), (6,)),
    (lambda: TinyAverageVelocityNet((2, 4, 4)), (2, 4, 4)),
    (lambda: TinyConvNet(3), (3, 5, 4)),
])
def test_any_shape_and_the_gradient_reaches_the_model_through_the_prediction_only(make_model, data_shape):
  model = make_model().double()
  mean_flow = MeanFlow(model, interval_fraction=1.0)
  data, noise = torch.randn(6, *data_shape, dtype=torch.float64), torch.randn(6, *data_shape, dtype=torch.float64)
  times, end_times = mean_flow.sample_time_pairs(6, dtype=torch.float64)
  loss = mean_flow(data, noise=noise, times=times, end_times=end_times)
  assert loss.dim() == 0 and mean_flow.data_shape == data_shape
  loss.backward()
  gradients = [parameter.grad.clone() for parameter in model.parameters()]
  assert all(gradient.abs().sum() > 0 for gradient in gradients)
  # The same loss with the target and the weight as constants, the prediction from a plain forward pass.
  model.zero_grad()
  x_t = flow_math.interpolate(noise, data, times)
  prediction, target = mean_flow.average_velocity_and_target(x_t, times, end_times, data - noise)
  assert prediction.requires_grad and not target.requires_grad
  squared = (model(x_t, times, end_times=end_times) - target).square().flatten(1).sum(dim=1)
  (squared / (squared.detach() + 1e-3)).mean().backward()
  for gradient, parameter in zip(gradients, model.parameters()):
    torch.testing.assert_close(gradient, parameter.grad, rtol=1e-10, atol=1e-12)


def test_a_random_batch_of_float32_images_trains():
  model = TinyConvNet(3)
  mean_flow = MeanFlow(model)
  loss = mean_flow(torch.randn(8, 3, 6, 6))
  loss.backward()
  assert torch.isfinite(loss) and model.conv.weight.grad is not None
  assert mean_flow.sample(batch_size=2, steps=2).shape == (2, 3, 6, 6)


# ---------------------------------------------------------------------------------------------------------------
# 5. Sampling: one network evaluation per step, on the uniform grid.

@pytest.mark.parametrize('steps', [1, 2, 4])
def test_sampling_evaluates_the_network_once_per_step_on_a_uniform_grid(steps):
  model = RecordingModel(TinyAverageVelocityNet((3,)))
  mean_flow = MeanFlow(model)
  samples = mean_flow.sample(batch_size=5, steps=steps, data_shape=(3,))
  assert samples.shape == (5, 3) and mean_flow.last_sample_nfe == steps == len(model.calls)
  grid = torch.linspace(0.0, 1.0, steps + 1)
  for index, (times, end_times, labels) in enumerate(model.calls):
    assert torch.equal(times, grid[index].repeat(5)) and torch.equal(end_times, grid[index + 1].repeat(5))
    assert labels is None


def test_labels_reach_the_model_and_are_dropped_in_training():
  model = RecordingModel(TinyAverageVelocityNet((3,), num_classes=4))
  mean_flow = MeanFlow(model, num_classes=4, label_dropout=0.5)
  labels = torch.tensor([0, 1, 2, 3, 0, 1])
  mean_flow(torch.randn(6, 3), labels=labels, label_drops=torch.tensor([False, True, False, False, True, False]))
  assert torch.equal(model.calls[-1][2], torch.tensor([0, 4, 2, 3, 4, 1]))
  model.calls.clear()
  mean_flow.sample(labels=torch.tensor([3, 1]), steps=2)
  assert [call[2].tolist() for call in model.calls] == [[3, 1], [3, 1]]
  model.calls.clear()
  mean_flow.sample(batch_size=2, steps=1)  # No labels: the null label, the unconditional flow.
  assert model.calls[0][2].tolist() == [4, 4]
  with pytest.raises(ValueError, match='class-conditional'):
    MeanFlow(TinyAverageVelocityNet((3,))).sample(labels=torch.tensor([0]), data_shape=(3,))


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance trained into the target (Geng et al. 2025, Sec. 4.2, App. B.1).

def guidance_problem(seed):
  generator = torch.Generator().manual_seed(seed)
  model = TinyAverageVelocityNet((4,), num_classes=3).double()
  data, noise = (torch.randn(6, 4, dtype=torch.float64, generator=generator) for _ in range(2))
  labels, drops = torch.tensor([0, 1, 2, 0, 1, 3]), torch.tensor([False, True, False, False, False, False])
  return model, data, noise, labels, drops, torch.tensor([0, 3, 2, 0, 1, 3])  # Last: the labels after dropout.


def test_guidance_without_intervals_regresses_the_guided_velocity():
  model, data, noise, labels, drops, model_labels = guidance_problem(4)
  times = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
  mean_flow = MeanFlow(model, num_classes=3, label_dropout=0.1, guidance_scale=2.0, interval_fraction=0.0,
                       adaptive_weight_power=0.0)
  loss = mean_flow.per_sample_loss(data, noise=noise, times=times, end_times=times, labels=labels, label_drops=drops)
  with torch.no_grad():
    x_t, velocity = flow_math.interpolate(noise, data, times), data - noise
    unconditional = model(x_t, times, labels=torch.full((6,), 3), end_times=times)
    guided = 2.0 * velocity + (1.0 - 2.0) * unconditional
    guided[model_labels == 3] = velocity[model_labels == 3]  # Dropped and null labels learn the plain velocity.
    expected = (model(x_t, times, labels=model_labels, end_times=times) - guided).square().sum(dim=1)
  torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_guidance_over_intervals_uses_the_guided_velocity_as_target_and_tangent():
  model, data, noise, labels, drops, model_labels = guidance_problem(5)
  times = torch.tensor([0.1, 0.2, 0.4, 0.5, 0.6, 0.7], dtype=torch.float64)
  end_times = torch.tensor([0.5, 0.9, 0.8, 1.0, 0.6, 0.9], dtype=torch.float64)
  scale, mix = 1.5, 0.5
  mean_flow = MeanFlow(model, num_classes=3, label_dropout=0.1, guidance_scale=scale, guidance_mix=mix,
                       guidance_interval=(0.3, 1.0), adaptive_weight_power=0.0)
  loss = mean_flow.per_sample_loss(data, noise=noise, times=times, end_times=end_times, labels=labels,
                                   label_drops=drops)
  with torch.no_grad():
    x_t, velocity = flow_math.interpolate(noise, data, times), data - noise
    conditional = model(x_t, times, labels=model_labels, end_times=times)
    unconditional = model(x_t, times, labels=torch.full((6,), 3), end_times=times)
    guided = scale * velocity + mix * conditional + (1.0 - scale - mix) * unconditional
    plain = (model_labels == 3) | (times < 0.3)  # Rows 0, 1 (before the interval) and 5 (null label).
    guided[plain] = velocity[plain]
    target = finite_difference_target(lambda z, a, b: model(z, a, labels=model_labels, end_times=b), x_t, times,
                                      end_times, guided)
    expected = (model(x_t, times, labels=model_labels, end_times=end_times) - target).square().sum(dim=1)
  torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)


def test_guidance_needs_labels_and_label_dropout():
  with pytest.raises(ValueError, match='label_dropout'):
    MeanFlow(nn.Identity(), num_classes=3, guidance_scale=2.0)
  with pytest.raises(ValueError, match='num_classes'):
    MeanFlow(nn.Identity(), guidance_mix=0.5)
  with pytest.raises(ValueError, match='both times= and end_times='):
    MeanFlow(nn.Identity())(torch.zeros(2, 3), times=torch.zeros(2))
