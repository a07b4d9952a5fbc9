"""Timing of the benchmark scripts: calls timed with the device synchronised before and after, so that the time
covers the work a call queued on a GPU and not only its launch."""
import resource
import time

import torch


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
