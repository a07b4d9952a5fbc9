"""FIR-filtered 2x up/down sampling (Karras et al. 2019/2020, "upfirdn2d") in plain PyTorch: CPU and CUDA, no
compiled op. The published NCSN++ models use the [1, 3, 3, 1] filter."""
import functools

import torch
import torch.nn.functional as F


def fir_kernel_2d(taps, device=None, dtype=torch.float32):
  """Separable 2-D kernel from 1-D taps (outer product), normalised to sum to 1; treat it as read-only.

  Made once per (taps, device, dtype) and kept: making it copies the taps from the host, which a forward captured
  in a CUDA graph (``cuda_graphs``) must not do."""
  return _fir_kernel_2d(tuple(taps), torch.device(device) if device is not None else None, dtype)


@functools.lru_cache(maxsize=None)  # Never evicted: a captured graph reads a kernel's memory.
def _fir_kernel_2d(taps, device, dtype):
  k = torch.as_tensor(taps, dtype=dtype, device=device)
  if k.dim() == 1:
    k = torch.outer(k, k)
  return k / k.sum()


def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
  """Zero-insert upsample by ``up``, pad by ``pad`` = (before, after) on both axes, filter with ``kernel``
  (true convolution, i.e. the kernel flipped), keep every ``down``-th pixel. (B, C, H, W) -> (B, C, H', W')."""
  if min(pad) < 0:
    raise ValueError(f'negative padding {pad} is not supported')
  batch, channels, height, width = x.shape
  if up > 1:  # Insert up - 1 zeros after every pixel along H and W.
    x = x.reshape(batch, channels, height, 1, width, 1)
    x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
    x = x.reshape(batch, channels, height * up, width * up)
  x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
  weight = torch.flip(kernel, [0, 1]).to(x.dtype)[None, None].repeat(channels, 1, 1, 1)
  x = F.conv2d(x, weight, groups=channels)
  return x[:, :, ::down, ::down] if down > 1 else x


def upsample_2d(x, taps, factor=2, gain=1.0):
  """FIR upsampling: (B, C, H, W) -> (B, C, fH, fW)."""
  k = fir_kernel_2d(taps, x.device) * (gain * factor ** 2)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, taps, factor=2, gain=1.0):
  """FIR downsampling: (B, C, H, W) -> (B, C, H/f, W/f)."""
  k = fir_kernel_2d(taps, x.device) * gain
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x, weight, taps, factor=2, gain=1.0):
  """Fused transposed convolution (stride ``factor``) and FIR filter; ``weight`` is (out, in, kh, kw)."""
  kernel_w = weight.shape[-1]
  k = fir_kernel_2d(taps, x.device) * (gain * factor ** 2)
  p = (k.shape[0] - factor) - (kernel_w - 1)
  # conv_transpose2d takes (in, out, kh, kw) and correlates, so flip the kernel to convolve.
  transposed = torch.flip(weight, [2, 3]).transpose(0, 1)
  x = F.conv_transpose2d(x, transposed, stride=factor)
  return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, weight, taps, factor=2, gain=1.0):
  """Fused FIR filter and strided convolution; ``weight`` is (out, in, kh, kw)."""
  kernel_w = weight.shape[-1]
  k = fir_kernel_2d(taps, x.device) * gain
  p = (k.shape[0] - factor) + (kernel_w - 1)
  x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
  return F.conv2d(x, weight, stride=factor)
