"""An endless, reshuffled, multi-worker stream of batches that can restart at any batch index."""
import signal

import torch
from torch.utils.data import DataLoader, Sampler


def ignore_stop_signals(worker_id):
  """Data-loader workers leave SIGTERM / SIGINT to the main process, which saves a checkpoint before it stops them
  (a worker killed by the signal would make the loader raise in the middle of that checkpoint)."""
  del worker_id
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_permutation(num_items, seed, epoch):
  """The item order of one epoch: a permutation that depends only on (seed, epoch)."""
  generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
  return torch.randperm(num_items, generator=generator)


class EndlessShuffledSampler(Sampler):
  """Item indices forever, reshuffling every epoch: the stream of every global batch from ``start_batch`` on.

  Global batch k is stream positions [k G, (k + 1) G). Each process yields only its micro-batches of it: rows
  [(j world + rank) m, (j world + rank + 1) m) for j = 0 .. G / (world m) - 1 (``distributed.batch_split``), so
  the rows, and their order within the global batch, do not depend on the number of processes.
  """

  def __init__(self, num_items, seed, *, global_batch, start_batch=0, micro_batch=None, rank=0, world=1):
    if num_items == 0:
      raise ValueError('The dataset is empty: there is nothing to train on')
    self.num_items, self.seed, self.global_batch, self.start_batch = num_items, seed, global_batch, start_batch
    self.micro_batch = micro_batch or global_batch // world
    self.rank, self.world = rank, world
    self.micro_steps = global_batch // (world * self.micro_batch)
    self._epoch, self._order = None, None

  def _item(self, position):
    epoch, offset = divmod(position, self.num_items)
    if epoch != self._epoch:
      self._epoch, self._order = epoch, epoch_permutation(self.num_items, self.seed, epoch).tolist()
    return self._order[offset]

  def __iter__(self):
    batch = self.start_batch
    while True:
      for micro_step in range(self.micro_steps):
        first = batch * self.global_batch + (micro_step * self.world + self.rank) * self.micro_batch
        for position in range(first, first + self.micro_batch):
          yield self._item(position)
      batch += 1


def endless_batches(dataset, batch_size, *, seed, start_batch=0, num_workers=0, pin_memory=False, micro_batch=None,
                    rank=0, world=1):
  """Iterator over (m, C, H, W) micro-batches; batch k of a run is the same whether or not the run was resumed.

  The stream is the concatenation of seeded per-epoch permutations, cut into global batches of ``batch_size``, so a
  run resumed at update ``start_batch`` continues exactly where the interrupted one stopped. Under torchrun each
  process gets its rows of every global batch (``micro_batch`` rows at a time, default batch_size / world).
  """
  if len(dataset) < batch_size:
    raise ValueError(f'The dataset has {len(dataset)} images, fewer than one batch of {batch_size}')
  sampler = EndlessShuffledSampler(len(dataset), seed, global_batch=batch_size, start_batch=start_batch,
                                   micro_batch=micro_batch, rank=rank, world=world)
  loader = DataLoader(dataset, batch_size=sampler.micro_batch, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals,
                      # Its own generator, so creating the loader never draws from the global RNG.
                      generator=torch.Generator().manual_seed(seed))
  return iter(loader)
