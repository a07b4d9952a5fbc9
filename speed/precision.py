"""Arithmetic precision: the one table of autocast dtypes, training's 'auto' choice, and the autocast contexts.

``training.precision`` takes any entry of ``PRECISIONS`` or 'auto'; ``sampling.precision`` those of
``SAMPLING_PRECISIONS`` (fp16 sampling is not offered: its range would need the training's grad scaler's care and
nothing has measured it). Weights, optimiser state and the solver's state stay float32 under every setting.
"""
import contextlib

import torch

# Autocast dtype of each setting; None: no autocast (the network's own float32, TF32 on CUDA where allowed).
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
SAMPLING_PRECISIONS = ('fp32', 'bf16')


def native_bf16(device):
  """Whether ``device`` does bf16 arithmetic natively: CPUs with AVX512-BF16 or AMX (oneDNN's bf16 kernels), and
  CUDA GPUs of compute capability 8.0 or later."""
  if device.type == 'cpu':
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
  if device.type == 'cuda':
    return torch.cuda.get_device_capability(device)[0] >= 8
  return False


def resolve_precision(config, device):
  """``training.precision``, with 'auto' resolved for ``device``: bf16 on CPUs with native bf16 (measured 1.4x
  faster than fp32 on the digits demo and 1.6x on the CIFAR-10 DDPM++ step, same loss curve:
  benchmarks/precision_curve.py), fp32 elsewhere. On CUDA 'auto' stays fp32 (TF32) until bf16 is measured faster
  there: eager bf16 ran at 0.79x of fp32 on an H100 (NCHW/NHWC conversions, GroupNorm casts)."""
  precision = config.training.precision
  if precision == 'auto':
    return 'bf16' if device.type == 'cpu' and native_bf16(device) else 'fp32'
  if precision not in PRECISIONS:
    raise ValueError(f"Unknown training.precision {precision!r}; valid: {list(PRECISIONS)} or 'auto'")
  return precision


def check_sampling_precision(precision):
  """Raises a ValueError naming the valid values for a ``sampling.precision`` outside ``SAMPLING_PRECISIONS``."""
  if precision not in SAMPLING_PRECISIONS:
    raise ValueError(f'Unknown sampling.precision {precision!r}; valid: {list(SAMPLING_PRECISIONS)}')


def autocast(precision, device_type, cache_enabled=True):
  """The autocast context of ``precision`` (a key of ``PRECISIONS``) on ``device_type``; a null context for fp32."""
  dtype = PRECISIONS[precision]
  if dtype is None:
    return contextlib.nullcontext()
  return torch.autocast(device_type, dtype=dtype, cache_enabled=cache_enabled)


def training_autocast(config, device):
  """The ``training.precision`` autocast context: fp32 (off), bf16 or fp16 (weights and optimiser stay fp32)."""
  return autocast(resolve_precision(config, device), device.type)
