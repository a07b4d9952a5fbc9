"""A census of the operators a block of PyTorch code dispatches: a CPU-measurable proxy of GPU step costs.

On a GPU every dispatched operator is at least one kernel launch, and a host read (``.item()``, ``bool(t)``, an
operator whose output shape depends on the data) stalls the CPU until the device has caught up; both bound how
fast a small network can train. Counting them needs no GPU, so a test can hold an upper bound on each.
"""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that make the host wait for the device: scalar reads, and outputs whose shape depends on the values.
HOST_READ_OPERATORS = frozenset({
    aten._local_scalar_dense.default,  # .item(), bool(tensor), int(tensor), float(tensor)
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
    aten.unique_dim.default,
})


class DispatchCensus(TorchDispatchMode):
  """Counts the aten operators dispatched inside ``with DispatchCensus() as census:`` (forward, backward and
  optimiser alike), ``census.operators`` by name and ``census.host_reads`` among them."""

  def __init__(self):
    super().__init__()
    self.operators = collections.Counter()
    self.host_reads = collections.Counter()

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    name = func.name()
    self.operators[name] += 1
    if func in HOST_READ_OPERATORS or self._copies_to_host(func, args, kwargs or {}):
      self.host_reads[name] += 1
    return func(*args, **(kwargs or {}))

  @staticmethod
  def _copies_to_host(func, args, kwargs):
    """A copy from an accelerator into host memory (``.cpu()``, ``.to('cpu')``, ``cpu_tensor.copy_(cuda)``)."""
    if func is aten.copy_.default:
      destination, source = args[0], args[1]
      return destination.device.type == 'cpu' and source.device.type != 'cpu'
    if func is aten._to_copy.default:
      device = kwargs.get('device')
      return device is not None and torch.device(device).type == 'cpu' and args[0].device.type != 'cpu'
    return False

  @property
  def total(self):
    return sum(self.operators.values())

  @property
  def total_host_reads(self):
    return sum(self.host_reads.values())
