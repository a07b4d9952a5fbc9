"""An endless, reshuffled, multi-worker stream of batches that can restart at any batch index."""
import signal

import torch
from torch.utils.data import DataLoader, Sampler

from datasets.batch import Batch, collate


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
  """Iterator over micro-batches of m items as ``Batch`` (``datasets.batch.collate``: x1 (m, C, H, W) images, with
  (m,) int64 labels of a labelled dataset; z0 and z1 of pair shards); batch k of a run is the same whether or not
  the run was resumed.

  The stream is the concatenation of seeded per-epoch permutations, cut into global batches of ``batch_size``, so a
  run resumed at update ``start_batch`` continues exactly where the interrupted one stopped. Under torchrun each
  process gets its rows of every global batch (``micro_batch`` rows at a time, default batch_size / world).
  """
  if len(dataset) < batch_size:
    raise ValueError(f'The dataset has {len(dataset)} images, fewer than one batch of {batch_size}')
  sampler = EndlessShuffledSampler(len(dataset), seed, global_batch=batch_size, start_batch=start_batch,
                                   micro_batch=micro_batch, rank=rank, world=world)
  loader = DataLoader(dataset, batch_size=sampler.micro_batch, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals,
                      # Its own generator, so creating the loader never draws from the global RNG.
                      generator=torch.Generator().manual_seed(seed))
  return iter(loader)


def dataset_tensor(dataset, num_workers=0, batch_size=500):
  """(images, labels): every image of ``dataset`` in one (N, C, H, W) CPU tensor, uint8 when all values are 8-bit
  levels k / 255 (as ToTensor makes them; 4x smaller, converted back exactly), float32 otherwise (e.g. resized
  digits); labels an (N,) int64 CPU tensor for a labelled dataset ((image, label) items), else None."""
  parts, label_parts = [], []
  # Its own generator: a loader draws a seed for its workers, which must not come from the global RNG (dropout).
  for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=collate, generator=torch.Generator().manual_seed(0)):
    if batch.labels is not None:
      label_parts.append(batch.labels.long())
    levels = (batch.x1 * 255.0).round()
    parts.append(levels.to(torch.uint8) if torch.equal(levels / 255.0, batch.x1) else batch.x1.float())
  if all(part.dtype == torch.uint8 for part in parts):
    images = torch.cat(parts)
  else:
    images = torch.cat([part.float() / 255.0 if part.dtype == torch.uint8 else part for part in parts])
  return images, torch.cat(label_parts) if label_parts else None


# The float32 value k / 255 of each 8-bit level k, by true division on the CPU: the loader's values (ToTensor's
# ``.div(255)``, the division ``dataset_tensor`` checks levels against). A device may divide otherwise (CUDA computes
# ``tensor / 255`` as ``tensor * (1 / 255)``, one ulp off for 126 of the 256 levels), so resident 8-bit images are
# looked up in this table, never divided on the device.
LEVEL_VALUES = torch.arange(256, dtype=torch.float32) / 255.0


class ResidentBatches:
  """The micro-batches of ``endless_batches``, drawn from images held on the training device.

  Same stream (seeded per-epoch permutations cut into global batches, this process's rows of each), so a run
  resumed at ``start_batch`` and the loader path see the same images in the same order; the gather runs on the
  device from a permutation kept there, so a batch costs no loader, worker or host-to-device copy. With ``labels``
  ((N,) integers, those of ``dataset_tensor`` of a labelled dataset) its ``Batch`` es carry the labels, int64 on
  the images' device, as ``endless_batches`` does for that dataset. 8-bit (uint8) images become the loader's values
  k / 255 bit for bit on any device: gathered from ``LEVEL_VALUES``, moved there once, not divided there.
  """

  def __init__(self, images, batch_size, *, seed, start_batch=0, micro_batch=None, rank=0, world=1, labels=None):
    if images.shape[0] < batch_size:
      raise ValueError(f'The dataset has {images.shape[0]} images, fewer than one batch of {batch_size}')
    if labels is not None and tuple(labels.shape) != (images.shape[0],):
      raise ValueError(f'labels must hold one label per image, shape ({images.shape[0]},); got {tuple(labels.shape)}')
    self.images, self.seed = images, seed
    self.labels = None if labels is None else labels.to(images.device, torch.long)
    self.sampler = EndlessShuffledSampler(images.shape[0], seed, global_batch=batch_size, start_batch=start_batch,
                                          micro_batch=micro_batch, rank=rank, world=world)
    self._orders = {}
    self._level_values = LEVEL_VALUES.to(images.device) if images.dtype == torch.uint8 else None

  def _order(self, epoch):
    if epoch not in self._orders:
      self._orders = {e: order for e, order in self._orders.items() if e >= epoch - 1}
      self._orders[epoch] = epoch_permutation(self.images.shape[0], self.seed, epoch).to(self.images.device)
    return self._orders[epoch]

  def _indices(self, first, count):
    """Item indices of stream positions [first, first + count), which span at most two epochs."""
    n, pieces = self.images.shape[0], []
    while count:
      epoch, offset = divmod(first, n)
      take = min(count, n - offset)
      pieces.append(self._order(epoch)[offset:offset + take])
      first, count = first + take, count - take
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

  def __iter__(self):
    s = self.sampler
    batch = s.start_batch
    while True:
      for micro_step in range(s.micro_steps):
        first = batch * s.global_batch + (micro_step * s.world + s.rank) * s.micro_batch
        indices = self._indices(first, s.micro_batch)
        images = self.images[indices]
        if self._level_values is not None:
          images = self._level_values[images.long()]
        yield Batch(None, images, labels=None if self.labels is None else self.labels[indices])
      batch += 1
