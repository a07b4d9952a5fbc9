"""torch.distributed for torchrun: process group set-up, rank queries, and the split of a global batch.

``torchrun --nproc_per_node=N main.py ...`` (plus ``--nnodes``/``--node_rank``/``--rdzv_endpoint`` across nodes)
sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is the single process (rank 0 of 1). NCCL is
used on CUDA, gloo on the CPU.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def is_distributed():
  return dist.is_available() and dist.is_initialized()


def rank():
  return dist.get_rank() if is_distributed() else 0


def world_size():
  return dist.get_world_size() if is_distributed() else 1


def is_main_process():
  """Rank 0: the only process that logs metrics and writes checkpoints."""
  return rank() == 0


def launched_by_torchrun():
  return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


_device = None  # This process's device, chosen by ``initialize``.


def resolve_device(setting='auto'):
  """The torch device that a ``device`` setting names for this process.

  'auto': the LOCAL_RANK GPU under torchrun (GPU 0 otherwise) when CUDA is present, else the CPU; 'cpu'; 'cuda'
  (the LOCAL_RANK GPU, which CUDA must provide); 'cuda:N' (a single process only: torchrun assigns GPUs by rank).
  """
  setting = str(setting).strip().lower()
  local_rank = int(os.environ.get('LOCAL_RANK', 0)) if launched_by_torchrun() else 0
  if setting == 'auto':
    return torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
  if setting == 'cpu':
    return torch.device('cpu')
  if setting == 'cuda' or setting.startswith('cuda:'):
    if not torch.cuda.is_available():
      raise ValueError(f'device={setting!r} asks for a GPU, but CUDA is not available to this PyTorch '
                       f'({torch.__version__}); use --device=cpu or --device=auto')
    if setting == 'cuda':
      index = local_rank
    else:
      index = setting[len('cuda:'):]
      if not index.isdigit():
        raise ValueError(f"device={setting!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
      index = int(index)
      if launched_by_torchrun() and int(os.environ['WORLD_SIZE']) > 1:
        raise ValueError(f"device={setting!r} names one GPU, but torchrun started {os.environ['WORLD_SIZE']} "
                         f"processes: use --device=cuda (each process takes its LOCAL_RANK's GPU) or auto")
    if index >= torch.cuda.device_count():
      raise ValueError(f'device={setting!r}: this machine has {torch.cuda.device_count()} visible GPU(s) '
                       f'(CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES", "unset")})')
    return torch.device('cuda', index)
  raise ValueError(f"device={setting!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def initialize(device_setting='auto', timeout_minutes=30):
  """Chooses this process's device (``resolve_device``), joins the process group torchrun describes (once: NCCL
  on CUDA, gloo on the CPU) and returns the device."""
  global _device
  chosen = resolve_device(device_setting)
  if is_distributed():
    if chosen != _device:
      raise ValueError(f'This process already runs on {_device}; it cannot switch to {chosen}')
    return _device
  _device = chosen
  if chosen.type == 'cuda':
    torch.cuda.set_device(chosen)
  if launched_by_torchrun():
    dist.init_process_group('nccl' if chosen.type == 'cuda' else 'gloo',
                            timeout=datetime.timedelta(minutes=timeout_minutes))
  return chosen


def device():
  """The device chosen by ``initialize`` (before it: what 'auto' would choose)."""
  return _device if _device is not None else resolve_device('auto')


def shutdown():
  if is_distributed():
    dist.destroy_process_group()


def barrier():
  if is_distributed():
    dist.barrier()


@contextlib.contextmanager
def main_process_first():
  """Rank 0 runs the block first (e.g. to set files aside or write a manifest), then the other ranks run it."""
  if not is_main_process():
    barrier()
  yield
  if is_main_process():
    barrier()


def broadcast_object(value):
  """Rank 0's ``value`` on every rank (so that all ranks take the same decision)."""
  if not is_distributed():
    return value
  box = [value]
  dist.broadcast_object_list(box, src=0)
  return box[0]


def all_reduce_max(flag):
  """The maximum over ranks of a small int (e.g. "a stop signal arrived here")."""
  if not is_distributed():
    return flag
  tensor = torch.tensor([flag], dtype=torch.int64, device=device())
  dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
  return int(tensor.item())


def all_reduce_mean(tensor):
  """The mean over ranks of a tensor (a copy; the input is left alone)."""
  if not is_distributed():
    return tensor
  tensor = tensor.detach().clone()
  dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
  return tensor / world_size()


def batch_split(global_batch, grad_accum_steps=1, world=None):
  """Rows per micro-batch when a global batch is split over ranks and accumulation steps; an uneven split is an error.

  Micro-batch j of rank r holds rows [(j * world + r) m, (j * world + r + 1) m) of the global batch (m the
  returned size), so every row is used once, whatever the number of processes.
  """
  world = world_size() if world is None else world
  parts = world * grad_accum_steps
  if grad_accum_steps < 1 or global_batch % parts:
    raise ValueError(f'training.batch_size={global_batch} must split evenly over {world} processes x '
                     f'training.grad_accum_steps={grad_accum_steps} micro-batches; choose a batch size divisible by '
                     f'{parts}, or change the number of processes or accumulation steps')
  return global_batch // parts


def chunk_offset(micro_step, micro_batch, rank_=None, world=None):
  """First row, in the global batch, of this rank's ``micro_step``-th micro-batch."""
  rank_ = rank() if rank_ is None else rank_
  world = world_size() if world is None else world
  return (micro_step * world + rank_) * micro_batch


def shard_indices(count, rank_=None, world=None):
  """The work items (shards, rounds) of this rank: i = rank, rank + world, ... below ``count``."""
  rank_ = rank() if rank_ is None else rank_
  world = world_size() if world is None else world
  return list(range(rank_, count, world))
