"""Timing of the benchmark scripts: calls timed with the device synchronised before and after, so that the time
covers the work a call queued on a GPU and not only its launch."""
import resource
import time

import torch
from torch.utils import flop_counter


def synchronize(device):
  """Waits until ``device`` (a torch.device) has finished its queued work; nothing to wait for on the CPU."""
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def peak_rss_bytes():
  """This process's peak resident memory so far, in bytes (the CPU's figure of peak memory)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def timed_call(device, fn):
  """(fn(), its seconds), the device synchronised before and after the call."""
  synchronize(device)
  start = time.perf_counter()
  result = fn()
  synchronize(device)
  return result, time.perf_counter() - start


def timed(device, fn, repeats=1):
  """(fn() of the last call, the least seconds over ``repeats`` calls), each call timed as ``timed_call``."""
  best = float('inf')
  for _ in range(repeats):
    result, seconds = timed_call(device, fn)
    best = min(best, seconds)
  return result, best


def count_cpu_attention_flops():
  """Teaches ``torch.utils.flop_counter`` the CPU's fused attention kernel, which it does not count (it counts the
  GPU's flash, memory-efficient and cuDNN kernels): the same FLOPs as those, 4 T^2 D forward and 10 T^2 D backward
  per head (the scores recomputed, then 4 gradient matmuls). Without it the DiT's attention is missing from the
  CPU's counts (5% of DiT-B/2's)."""
  aten = torch.ops.aten
  forward_op = aten._scaled_dot_product_flash_attention_for_cpu
  backward_op = aten._scaled_dot_product_flash_attention_for_cpu_backward
  if forward_op in flop_counter.flop_registry:
    return

  @flop_counter.register_flop_formula(forward_op)
  def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

  @flop_counter.register_flop_formula(backward_op)
  def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
