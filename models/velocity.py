"""The one place where the library's time t in [0, 1] becomes the network's time input."""
import torch
from torch import nn

# The published networks receive t * 999 (the DDPM timestep scale) as their time input.
NETWORK_TIME_SCALE = 999.0


def time_scales(config):
  """(``model.time_scale``, ``model.interval_scale``): the factors from the library's t and s - t to the network's
  inputs, 999 where a config predates the keys (every published config and checkpoint)."""
  model = config.model
  return (float(model.get('time_scale', NETWORK_TIME_SCALE)),
          float(model.get('interval_scale', NETWORK_TIME_SCALE)))


class VelocityField(nn.Module):
  """Wraps a network as v(x, t) for ``rectified_flow_pytorch``: t in [0, 1] -> network time t * ``time_scale``
  (999 by default, the published scale).

  With ``end_times`` s (a network of two times, ``model.time_inputs`` = 2: MeanFlow's average velocity over [t, s]),
  the network also receives the step's length, ``interval_cond`` = (s - t) * ``interval_scale`` (by default the same
  as ``time_scale``; MeanFlow's own configs give the network both on the raw [0, 1] scale).
  """

  def __init__(self, net, time_scale=NETWORK_TIME_SCALE, channels_last=False, interval_scale=None):
    super().__init__()
    self.net = net
    self.time_scale = time_scale
    self.interval_scale = time_scale if interval_scale is None else interval_scale
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

  def forward(self, x, times, labels=None, end_times=None):
    x = x.contiguous(memory_format=self.memory_format)
    # A one-time network has no interval_cond argument to pass.
    interval = {} if end_times is None else {'interval_cond': (end_times - times) * self.interval_scale}
    if labels is None:  # An unconditional network has no labels argument to pass.
      return self.net(x, times * self.time_scale, **interval)
    return self.net(x, times * self.time_scale, labels, **interval)
