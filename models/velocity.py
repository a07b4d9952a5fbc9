"""The one place where the library's time t in [0, 1] becomes the network's time input."""
import torch
from torch import nn

# The published networks receive t * 999 (the DDPM timestep scale) as their time input.
NETWORK_TIME_SCALE = 999.0


class VelocityField(nn.Module):
  """Wraps a network as v(x, t) for ``rectified_flow_pytorch``: t in [0, 1] -> network time t * 999."""

  def __init__(self, net, time_scale=NETWORK_TIME_SCALE, channels_last=False):
    super().__init__()
    self.net = net
    self.time_scale = time_scale
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

  def forward(self, x, times, labels=None):
    x = x.contiguous(memory_format=self.memory_format)
    if labels is None:  # An unconditional network has no labels argument to pass.
      return self.net(x, times * self.time_scale)
    return self.net(x, times * self.time_scale, labels)
