"""Building blocks of DDPM++ / NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

Module and parameter names (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0.W`` ...) follow the published
checkpoints so that their state_dicts load strictly.
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from models import fir_resampling


def variance_scaling_(tensor, scale=1.0):
  """In-place 'fan_avg' uniform variance-scaling init (the JAX/Flax default of the published models).

  For a weight of shape (out, in, *kernel): var = scale / ((fan_in + fan_out) / 2), U(-sqrt(3 var), sqrt(3 var)).
  A scale of 0 becomes 1e-10, so zero-initialised output layers still break symmetry as in the published code.
  """
  scale = scale if scale != 0 else 1e-10
  receptive_field = tensor[0][0].numel() if tensor.dim() > 2 else 1
  fan_in = tensor.shape[1] * receptive_field
  fan_out = tensor.shape[0] * receptive_field
  variance = scale / ((fan_in + fan_out) / 2.0)
  bound = math.sqrt(3.0 * variance)
  with torch.no_grad():
    return tensor.uniform_(-bound, bound)


def conv2d(in_ch, out_ch, kernel_size, init_scale=1.0, bias=True):
  """Same-padded convolution with variance-scaling weights and zero bias."""
  conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=bias)
  variance_scaling_(conv.weight, init_scale)
  if bias:
    nn.init.zeros_(conv.bias)
  return conv


def dense(in_dim, out_dim, init_scale=1.0):
  """Linear layer with variance-scaling weights and zero bias."""
  linear = nn.Linear(in_dim, out_dim)
  variance_scaling_(linear.weight, init_scale)
  nn.init.zeros_(linear.bias)
  return linear


class GroupNorm32(nn.GroupNorm):
  """``nn.GroupNorm`` (the same parameters and state dict) that runs in float32 under autocast on every device, as
  CUDA's autocast does for group_norm; on the CPU autocast would run it in bf16 with a float32 weight, whose forward
  mode derivative (MeanFlow's dual numbers) comes out float32 beside a bf16 value, a pair the next convolution
  rejects. Outside autocast it is ``nn.GroupNorm``."""

  def forward(self, x):
    if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
      return super().forward(x)
    with torch.autocast(x.device.type, enabled=False):
      return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels):
  """GroupNorm with min(C // 4, 32) groups and eps 1e-6, as in the published models (``GroupNorm32``)."""
  return GroupNorm32(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def group_norm_silu(x, weight, bias, num_groups, eps):
  """SiLU(GroupNorm(x)) for x (B, C, H, W) in any memory format: the statistics in fp32, the result in x's dtype.

  The groups are a view of x (``unflatten`` of the channel axis is a view for NCHW and NHWC alike), so nothing here
  asks for a layout; compiled (``fused_group_norm_silu``), the whole function becomes one reduction and one
  pointwise kernel that read x where it lies, where ATen's GroupNorm on a channels_last tensor first copies it to
  NCHW and SiLU is a pass of its own. Under autocast the result is cast once to x's dtype, where the eager pair
  returns fp32 (GroupNorm runs in fp32 under autocast) for the next convolution to cast: the same rounding.
  """
  batch, channels = x.shape[:2]
  groups = x.float().unflatten(1, (num_groups, channels // num_groups))  # (B, G, C/G, H, W)
  mean = groups.mean(dim=(2, 3, 4), keepdim=True)
  variance = groups.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
  normed = ((groups - mean) * torch.rsqrt(variance + eps)).flatten(1, 2)  # (B, C, H, W)
  return F.silu(normed * weight.float()[:, None, None] + bias.float()[:, None, None]).to(x.dtype)


FUSED_RECOMPILE_LIMIT = 64  # Dynamo's recompile_limit while the fused function is in use (its default is 8).


@functools.lru_cache(maxsize=None)
def fused_group_norm_silu(backend='inductor'):
  """``group_norm_silu`` compiled by torch.compile (made on first use: nothing compiles at import), as a function of
  the same arguments; ``backend`` is torch.compile's (tests pass one that compiles nothing).

  One specialisation per (channels, height, width, dtype, memory format, grad mode), each with its own kernels: the
  batch dimension is marked dynamic (``maybe_mark_dynamic``; a batch of 1 is still a specialisation of its own), so
  that the batch sizes of training, held-out loss, sampling, guided sampling (the batch doubled) and bits/dim share
  them. The CIFAR-10 DDPM++ has 11 such shapes (14 under bf16 autocast, where some inputs stay fp32): its eval sweep
  compiles 22 times, where with a static batch it needed 77. Dynamo's default of 8 recompilations per function is
  raised to ``FUSED_RECOMPILE_LIMIT``, and past it (not ``fullgraph``, which would raise there) the shapes not yet
  compiled run ``group_norm_silu`` eagerly: the same function, never an error. That it traces as one graph, and
  those counts, are tests/test_fused_norm.py's.
  """
  torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FUSED_RECOMPILE_LIMIT)
  compiled = torch.compile(group_norm_silu, backend=backend, dynamic=False)

  def fused(x, weight, bias, num_groups, eps):
    if not torch.compiler.is_compiling():  # Inside a compiled caller Dynamo inlines it and forbids the marking.
      torch._dynamo.maybe_mark_dynamic(x, 0)
    return compiled(x, weight, bias, num_groups, eps)

  return fused


def norm_act(norm, act, x, fused=False):
  """act(norm(x)); with ``fused`` (``model.fused_norm``) on CUDA and SiLU, one compiled ``group_norm_silu``."""
  if fused and x.is_cuda and isinstance(act, nn.SiLU):
    return fused_group_norm_silu()(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
  return act(norm(x))


def use_fused_norm_act(net, fused=True):
  """Sets every residual block of ``net`` to ``norm_act(..., fused)``; parameters and state dicts are unchanged."""
  for module in net.modules():
    if isinstance(module, ResnetBlockBigGANpp):
      module.fused_norm = fused
  return net


def get_activation(name):
  """The nonlinearity named in the config."""
  activations = {'swish': nn.SiLU(), 'silu': nn.SiLU(), 'relu': nn.ReLU(), 'elu': nn.ELU(),
                 'lrelu': nn.LeakyReLU(0.2)}
  if name.lower() not in activations:
    raise ValueError(f"Unknown model.nonlinearity {name!r}; valid names: {sorted(activations)}")
  return activations[name.lower()]


def positional_time_embedding(timesteps, dim, max_positions=10000):
  """Sinusoidal embedding of (B,) float timesteps into (B, dim) (Vaswani et al. 2017; DDPM)."""
  half = dim // 2
  freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                    * -(math.log(max_positions) / (half - 1)))
  angles = timesteps.float()[:, None] * freqs[None, :]
  emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
  if dim % 2 == 1:
    emb = F.pad(emb, (0, 1))
  return emb


class GaussianFourierProjection(nn.Module):
  """Random Fourier features of a scalar (Tancik et al. 2020): [sin(2 pi x W), cos(2 pi x W)], (B,) -> (B, 2 E)."""

  def __init__(self, embedding_size=256, scale=1.0):
    super().__init__()
    self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

  def forward(self, x):
    proj = x[:, None] * self.W[None, :] * (2 * math.pi)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class NIN(nn.Module):
  """Per-pixel linear map over channels ("network in network"): (B, C_in, H, W) -> (B, C_out, H, W)."""

  def __init__(self, in_dim, num_units, init_scale=0.1):
    super().__init__()
    self.W = nn.Parameter(variance_scaling_(torch.empty(num_units, in_dim), init_scale).t().contiguous())
    self.b = nn.Parameter(torch.zeros(num_units))

  def forward(self, x):
    y = torch.einsum('bchw,cd->bdhw', x, self.W)
    return y + self.b[None, :, None, None]


class AttnBlockpp(nn.Module):
  """Single-head self-attention over all H*W positions with a residual connection."""

  def __init__(self, channels, skip_rescale=False, init_scale=0.0):
    super().__init__()
    self.GroupNorm_0 = group_norm(channels)
    self.NIN_0 = NIN(channels, channels)
    self.NIN_1 = NIN(channels, channels)
    self.NIN_2 = NIN(channels, channels)
    self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
    self.skip_rescale = skip_rescale

  def forward(self, x):
    batch, channels, height, width = x.shape
    h = self.GroupNorm_0(x)
    q = self.NIN_0(h).flatten(2)  # (B, C, HW)
    k = self.NIN_1(h).flatten(2)
    v = self.NIN_2(h).flatten(2)
    logits = torch.einsum('bcq,bck->bqk', q, k) * (int(channels) ** -0.5)  # (B, HW, HW)
    weights = torch.softmax(logits, dim=-1)
    h = torch.einsum('bqk,bck->bcq', weights, v).reshape(batch, channels, height, width)
    h = self.NIN_3(h)
    return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


def naive_upsample_2d(x, factor=2):
  """Nearest-neighbour upsampling, (B, C, H, W) -> (B, C, fH, fW)."""
  return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def naive_downsample_2d(x, factor=2):
  """Average pooling over factor x factor blocks, (B, C, H, W) -> (B, C, H/f, W/f)."""
  return F.avg_pool2d(x, factor)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN-style residual block with optional 2x up/down sampling inside (Brock et al. 2019; NCSN++)."""

  def __init__(self, act, in_ch, out_ch=None, temb_dim=None, up=False, down=False, dropout=0.1,
               fir=False, fir_kernel=(1, 3, 3, 1), skip_rescale=True, init_scale=0.0):
    super().__init__()
    out_ch = out_ch if out_ch else in_ch
    self.GroupNorm_0 = group_norm(in_ch)
    self.Conv_0 = conv2d(in_ch, out_ch, 3)
    if temb_dim is not None:
      self.Dense_0 = dense(temb_dim, out_ch)
    self.GroupNorm_1 = group_norm(out_ch)
    self.Dropout_0 = nn.Dropout(dropout)
    self.Conv_1 = conv2d(out_ch, out_ch, 3, init_scale=init_scale)
    self.has_skip_conv = in_ch != out_ch or up or down
    if self.has_skip_conv:
      self.Conv_2 = conv2d(in_ch, out_ch, 1)
    self.act = act
    self.up, self.down = up, down
    self.fir, self.fir_kernel = fir, tuple(fir_kernel)
    self.skip_rescale = skip_rescale
    self.fused_norm = False  # use_fused_norm_act: GroupNorm + SiLU as one compiled kernel on CUDA.

  def forward(self, x, temb=None):
    h = norm_act(self.GroupNorm_0, self.act, x, self.fused_norm)
    if self.up:
      if self.fir:
        h, x = fir_resampling.upsample_2d(h, self.fir_kernel), fir_resampling.upsample_2d(x, self.fir_kernel)
      else:
        h, x = naive_upsample_2d(h), naive_upsample_2d(x)
    elif self.down:
      if self.fir:
        h, x = fir_resampling.downsample_2d(h, self.fir_kernel), fir_resampling.downsample_2d(x, self.fir_kernel)
      else:
        h, x = naive_downsample_2d(h), naive_downsample_2d(x)
    h = self.Conv_0(h)
    if temb is not None:
      h = h + self.Dense_0(self.act(temb))[:, :, None, None]
    h = self.Dropout_0(norm_act(self.GroupNorm_1, self.act, h, self.fused_norm))
    h = self.Conv_1(h)
    if self.has_skip_conv:
      x = self.Conv_2(x)
    return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class FIRConv2d(nn.Module):
  """3x3 convolution fused with FIR 2x up- or downsampling (``weight`` (out, in, k, k) and ``bias``)."""

  def __init__(self, in_ch, out_ch, kernel_size, up=False, down=False, fir_kernel=(1, 3, 3, 1)):
    super().__init__()
    assert up != down, 'FIRConv2d resamples: exactly one of up / down'
    self.weight = nn.Parameter(variance_scaling_(torch.empty(out_ch, in_ch, kernel_size, kernel_size)))
    self.bias = nn.Parameter(torch.zeros(out_ch))
    self.up, self.fir_kernel = up, tuple(fir_kernel)

  def forward(self, x):
    if self.up:
      x = fir_resampling.upsample_conv_2d(x, self.weight, self.fir_kernel)
    else:
      x = fir_resampling.conv_downsample_2d(x, self.weight, self.fir_kernel)
    return x + self.bias[None, :, None, None]


class Upsample(nn.Module):
  """2x upsampling: nearest or FIR, optionally with a (fused) 3x3 convolution."""

  def __init__(self, in_ch=None, out_ch=None, with_conv=False, fir=False, fir_kernel=(1, 3, 3, 1)):
    super().__init__()
    out_ch = out_ch if out_ch else in_ch
    if with_conv:
      if fir:
        self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, up=True, fir_kernel=fir_kernel)
      else:
        self.Conv_0 = conv2d(in_ch, out_ch, 3)
    self.with_conv, self.fir, self.fir_kernel = with_conv, fir, tuple(fir_kernel)

  def forward(self, x):
    if self.fir:
      return self.Conv2d_0(x) if self.with_conv else fir_resampling.upsample_2d(x, self.fir_kernel)
    h = naive_upsample_2d(x)
    return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
  """2x downsampling: average pooling or FIR, optionally with a (fused) 3x3 convolution."""

  def __init__(self, in_ch=None, out_ch=None, with_conv=False, fir=False, fir_kernel=(1, 3, 3, 1)):
    super().__init__()
    out_ch = out_ch if out_ch else in_ch
    if with_conv:
      if fir:
        self.Conv2d_0 = FIRConv2d(in_ch, out_ch, 3, down=True, fir_kernel=fir_kernel)
      else:
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=0)
        variance_scaling_(self.Conv_0.weight)
        nn.init.zeros_(self.Conv_0.bias)
    self.with_conv, self.fir, self.fir_kernel = with_conv, fir, tuple(fir_kernel)

  def forward(self, x):
    if self.fir:
      return self.Conv2d_0(x) if self.with_conv else fir_resampling.downsample_2d(x, self.fir_kernel)
    if self.with_conv:
      return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
    return naive_downsample_2d(x)


class Combine(nn.Module):
  """Merges a progressive-input pyramid level into the main path: 1x1 conv, then sum or concatenation."""

  def __init__(self, dim1, dim2, method='cat'):
    super().__init__()
    if method not in ('cat', 'sum'):
      raise ValueError(f"Unknown model.progressive_combine {method!r}; valid: 'cat', 'sum'")
    self.Conv_0 = conv2d(dim1, dim2, 1)
    self.method = method

  def forward(self, x, y):
    h = self.Conv_0(x)
    return torch.cat([h, y], dim=1) if self.method == 'cat' else h + y
