"""The Gaussian-to-Gaussian closed form of the MeanFlow tests and the small models they train, shared by
tests/test_mean_flow.py and tests/test_split_mean_flow.py.

The closed form: X0 ~ N(0, I) and X1 ~ N(mu, diag(sigma^2)) drawn independently. X_t = (1 - t) X0 + t X1 is
N(m(t), S(t)^2) per coordinate with m(t) = t mu and S(t)^2 = (1 - t)^2 + t^2 sigma^2, and the rectified flow's
marginal velocity E[X1 - X0 | X_t] moves each quantile along z_s = m(s) + S(s) / S(t) (z_t - m(t)). Its average
velocity (z_s - z_t) / (s - t) is, with S(s)^2 - S(t)^2 = (s - t) ((s + t)(1 + sigma^2) - 2),
    u(z, t, s) = mu + ((s + t)(1 + sigma^2) - 2) / (S(t) (S(s) + S(t))) (z - m(t)),
smooth through s = t, where it is the instantaneous velocity.
"""
import torch
from torch import nn

from rectified_flow_pytorch import flow_math

MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)


def gaussian_std(t):
  """S(t) of X_t, (B, 1) for (B,) times."""
  t = t[:, None]
  return ((1.0 - t) ** 2 + t ** 2 * SIGMA ** 2).sqrt()


class GaussianAverageVelocity(nn.Module):
  """The exact average velocity u(z, t, s) of the Gaussian-to-Gaussian rectified flow (module docstring)."""

  def __init__(self, instantaneous_only=False):
    super().__init__()
    self.instantaneous_only = instantaneous_only  # u(z, t, t) whatever s: a wrong average velocity.

  def forward(self, x, times, labels=None, end_times=None):
    end_times = times if end_times is None or self.instantaneous_only else end_times
    slope = ((end_times + times)[:, None] * (1.0 + SIGMA ** 2) - 2.0) / (
        gaussian_std(times) * (gaussian_std(end_times) + gaussian_std(times)))
    return MU + slope * (x - times[:, None] * MU)


def posterior_mean_pair(x_t, t):
  """(E[X0 | X_t], E[X1 | X_t]): a pair on whose straight line x_t lies, with velocity E[X1 - X0 | X_t]."""
  centred, variance, t = x_t - t[:, None] * MU, gaussian_std(t) ** 2, t[:, None]
  return (1.0 - t) * centred / variance, MU + t * SIGMA ** 2 * centred / variance


class TinyAverageVelocityNet(nn.Module):
  """A small network of any data shape: x flattened, with t, s (and a label embedding), through a tanh MLP."""

  def __init__(self, data_shape, num_classes=0, hidden=16):
    super().__init__()
    self.data_shape = tuple(data_shape)
    size = int(torch.Size(data_shape).numel())
    self.label_embedding = nn.Embedding(num_classes + 1, 2) if num_classes else None
    self.net = nn.Sequential(nn.Linear(size + 2 + (2 if num_classes else 0), hidden), nn.Tanh(),
                             nn.Linear(hidden, size))

  def forward(self, x, times, labels=None, end_times=None):
    end_times = times if end_times is None else end_times
    features = [x.flatten(1), times[:, None], end_times[:, None]]
    if self.label_embedding is not None:
      features.append(self.label_embedding(labels))
    return self.net(torch.cat(features, dim=1)).reshape(x.shape)


class TinyConvNet(nn.Module):
  """A 3x3 convolution of an image with its t and s as two constant channels."""

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels + 2, channels, 3, padding=1)

  def forward(self, x, times, labels=None, end_times=None):
    end_times = times if end_times is None else end_times
    planes = torch.stack([times, end_times], dim=1)[:, :, None, None].expand(-1, -1, *x.shape[2:])
    return self.conv(torch.cat([x, planes], dim=1))


class RecordingModel(nn.Module):
  """Wraps a model and records the (times, end_times, labels) of each call."""

  def __init__(self, model):
    super().__init__()
    self.model = model
    self.calls = []

  def forward(self, x, times, labels=None, end_times=None):
    self.calls.append((times.clone(), end_times.clone(), None if labels is None else labels.clone()))
    return self.model(x, times, labels=labels, end_times=end_times)


def start_and_end_times(batch, generator):
  """(B,) t < s in (0, 1], s = 1 for the first sample."""
  t, s = torch.rand(2, batch, dtype=torch.float64, generator=generator).sort(dim=0).values
  s[0] = 1.0
  return t, s


def points_on_the_path(batch, seed):
  """(generator, t, s, x_t): (B,) times t < s and x_t ~ X_t of the Gaussian flow at each t."""
  generator = torch.Generator().manual_seed(seed)
  t, s = start_and_end_times(batch, generator)
  x_t = t[:, None] * MU + gaussian_std(t) * torch.randn(batch, 3, dtype=torch.float64, generator=generator)
  return generator, t, s, x_t


class AffineAverageVelocity(nn.Module):
  """u(z, t, s) = a(t, s) + b(t, s) z per coordinate, a and b small MLPs of (t, s): the family of the exact answer."""

  def __init__(self, hidden=32):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                             nn.Linear(hidden, 6))

  def forward(self, x, times, labels=None, end_times=None):
    a, b = self.net(torch.stack([times, end_times], dim=1)).chunk(2, dim=1)
    return a + b * x


def train_on_the_gaussian(flow_class, updates=1500, **kwargs):
  """A ``flow_class`` of ``AffineAverageVelocity`` trained from scratch on N(mu, sigma^2): 75% intervals, uniform
  times, Adam at 1e-2 with a cosine decay, batches of 256."""
  torch.manual_seed(0)
  model = AffineAverageVelocity().double()
  flow = flow_class(model, interval_fraction=0.75, time_distribution='uniform', **kwargs)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, updates)
  for _ in range(updates):
    data = MU + SIGMA * torch.randn(256, 3, dtype=torch.float64)
    optimizer.zero_grad()
    flow(data).backward()
    optimizer.step()
    schedule.step()
  return flow


def assert_the_gradient_is_that_of_the_weighted_regression(flow, data_shape):
  """The flow's loss (p = 1, c = 1e-3) backpropagates exactly as sg(w) ||u - sg(target)||^2 of its own target,
  where every parameter gets a gradient: the target carries none."""
  model = flow.model
  data, noise = torch.randn(6, *data_shape, dtype=torch.float64), torch.randn(6, *data_shape, dtype=torch.float64)
  times = flow.sample_training_times(6, dtype=torch.float64)
  flow(data, noise=noise, **times).backward()
  gradients = [parameter.grad.clone() for parameter in model.parameters()]
  assert all(gradient.abs().sum() > 0 for gradient in gradients)
  model.zero_grad()
  x_t = flow_math.interpolate(noise, data, times['times'])
  extra = {key: times[key] for key in flow.target_kwargs}
  _, target = flow.average_velocity_and_target(x_t, times['times'], times['end_times'], data - noise, **extra)
  squared = (model(x_t, times['times'], end_times=times['end_times']) - target).square().flatten(1).sum(dim=1)
  (squared / (squared.detach() + 1e-3)).mean().backward()
  for gradient, parameter in zip(gradients, model.parameters()):
    torch.testing.assert_close(gradient, parameter.grad, rtol=1e-10, atol=1e-12)


def assert_it_samples_the_gaussian(flow, steps=(1, 2)):
  """The flow's k-step samples of 20,000 noises match N(mu, sigma^2)'s mean (to a tenth of sigma) and spread (to
  10%), for each k in ``steps``."""
  for count in steps:
    samples = flow.sample(noise=torch.randn(20000, 3, dtype=torch.float64), steps=count)
    assert ((samples.mean(0) - MU).abs() < 0.1 * SIGMA).all()
    torch.testing.assert_close(samples.std(0), SIGMA, rtol=0.1, atol=0)
