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
