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
  """Yields item indices forever, reshuffling every epoch, starting at position ``start`` of the stream."""

  def __init__(self, num_items, seed, start=0):
    if num_items == 0:
      raise ValueError('The dataset is empty: there is nothing to train on')
    self.num_items, self.seed, self.start = num_items, seed, start

  def __iter__(self):
    epoch, offset = divmod(self.start, self.num_items)
    while True:
      order = epoch_permutation(self.num_items, self.seed, epoch)
      yield from order[offset:].tolist()
      epoch, offset = epoch + 1, 0


def endless_batches(dataset, batch_size, *, seed, start_batch=0, num_workers=0, pin_memory=False):
  """Iterator over (B, C, H, W) batches; batch k of a run is the same whether or not the run was resumed.

  The stream is the concatenation of seeded per-epoch permutations, cut into batches of ``batch_size``, so a
  run resumed at update ``start_batch`` continues exactly where the interrupted one stopped.
  """
  if len(dataset) < batch_size:
    raise ValueError(f'The dataset has {len(dataset)} images, fewer than one batch of {batch_size}')
  sampler = EndlessShuffledSampler(len(dataset), seed, start=start_batch * batch_size)
  loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals,
                      # Its own generator, so creating the loader never draws from the global RNG.
                      generator=torch.Generator().manual_seed(seed))
  return iter(loader)
