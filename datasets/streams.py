"""The batch streams of training: this process's micro-batches of the training set (augmented, optionally held on
the device), of the held-out split, and of reflow pair shards, each in a fixed, seeded order that does not depend on
the number of processes."""
import logging
import time

import torch

import datasets
import distributed
from datasets import reflow_pairs
from models import num_classes


def micro_batches_of(config):
  """(rows per micro-batch, micro-batches per update) of this process (``distributed.batch_split``)."""
  micro_batch = distributed.batch_split(config.training.batch_size, config.training.grad_accum_steps)
  return micro_batch, config.training.grad_accum_steps


def rows_of(micro_step, micro_batch):
  first = distributed.chunk_offset(micro_step, micro_batch)
  return slice(first, first + micro_batch)


def split_labels(batch):
  """(images, labels) of a batch of a labelled dataset ((images, labels) or [images, labels]); (images, None) of
  a batch of images."""
  if isinstance(batch, (tuple, list)):
    return batch[0], batch[1]
  return batch, None


def resident_training_images(config, dataset, device):
  """(images, labels or None) on ``device`` when ``data.device_resident`` and the images fit in
  ``data.device_resident_max_gb`` (as uint8 for 8-bit images: CIFAR-10 takes 150 MB), else None (the loader path)."""
  data = config.data
  if not data.device_resident:
    return None
  nbytes = len(dataset) * split_labels(dataset[0])[0].numel()  # At one byte per value; float images take 4.
  if nbytes > data.device_resident_max_gb * 1e9:
    logging.info('Training images (%.1f GB as uint8) exceed data.device_resident_max_gb=%g: using the data loader',
                 nbytes / 1e9, data.device_resident_max_gb)
    return None
  started = time.time()
  images, labels = split_labels(datasets.dataset_tensor(dataset, num_workers=data.num_workers))
  images, labels = images.to(device), None if labels is None else labels.to(device)
  if images.element_size() * images.numel() > data.device_resident_max_gb * 1e9:
    logging.info('Training images (%.1f GB as %s) exceed data.device_resident_max_gb=%g: using the data loader',
                 images.element_size() * images.numel() / 1e9, images.dtype, data.device_resident_max_gb)
    return None
  logging.info('Training images on %s: %s %s, %.2f GB, loaded in %.1fs', device, tuple(images.shape), images.dtype,
               images.element_size() * images.numel() / 1e9, time.time() - started)
  return images, labels


def training_stream(config, dataset, start_batch, device, seed, resident=False):
  """This process's micro-batches of every global batch from ``start_batch`` on, with their rows: (batch, rows).

  With ``resident`` (an image dataset) the images may be held on the device (``data.device_resident``); the
  batches are the same images in the same order either way.
  """
  micro_batch, micro_steps = micro_batches_of(config)
  on_device = resident_training_images(config, dataset, device) if resident else None
  order = dict(batch_size=config.training.batch_size, seed=seed, start_batch=start_batch, micro_batch=micro_batch,
               rank=distributed.rank(), world=distributed.world_size())
  if on_device is not None:
    images, labels = on_device
    batches = iter(datasets.ResidentBatches(images, labels=labels, **order))
  else:
    batches = datasets.endless_batches(dataset, num_workers=config.data.num_workers,
                                       pin_memory=device.type == 'cuda', **order)
  for index, batch in enumerate(batches):
    yield batch, rows_of(index % micro_steps, micro_batch)


def data_generator_for(config, device):
  """The generator of the training augmentations: on the device with device-resident data (no host draws)."""
  return torch.Generator(device if config.data.device_resident else 'cpu').manual_seed(config.seed)


def data_batches(config, start_batch, device, generator=None):
  """Training micro-batches (None, x1, rows) of the configured dataset, augmented, in model space; (None, x1,
  rows, labels) for a class-conditional model."""
  data = config.data
  dataset = datasets.get_dataset(config, train=True)
  scaler = datasets.get_data_scaler(config)
  micro_steps = config.training.grad_accum_steps
  replay = None
  stream = training_stream(config, dataset, start_batch, device, config.seed, resident=True)
  for index, (batch, rows) in enumerate(stream):
    if generator is not None and micro_steps > 1:  # Each micro-batch slices the same global-batch draws.
      if index % micro_steps == 0:
        replay = generator.get_state()
      else:
        generator.set_state(replay)
    batch, labels = split_labels(batch)
    batch = batch.to(device, non_blocking=True)
    batch = datasets.augment(batch, random_flip=data.random_flip, uniform_dequantization=data.uniform_dequantization,
                             generator=generator, global_batch=config.training.batch_size, rows=rows)
    if labels is None:
      yield None, scaler(batch), rows
    else:
      yield None, scaler(batch), rows, labels.to(device, non_blocking=True)


def held_out_data_batches(config, start_batch, device):
  """(None, x1) batches of the held-out split in model space, not augmented (for the evaluation loss); (None, x1,
  labels) for a class-conditional model."""
  dataset = datasets.get_dataset(config, train=False)
  batches = datasets.endless_batches(dataset, min(config.training.batch_size, len(dataset)), seed=config.seed + 1,
                                     start_batch=start_batch)
  scaler = datasets.get_data_scaler(config)
  for batch in batches:
    batch, labels = split_labels(batch)
    x1 = scaler(batch.to(device, non_blocking=True))
    yield (None, x1) if labels is None else (None, x1, labels.to(device, non_blocking=True))


def pair_batches(config, start_batch, device, generator=None):
  """Training micro-batches (z0, z1, rows) read lazily from the pair shards under ``reflow.data_root``; (z0, z1,
  rows, labels) for pairs of a class-conditional teacher."""
  del generator  # Pairs are not augmented.
  shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
  pairs = reflow_pairs.PairShards(config.reflow.data_root, shape, num_classes(config))
  for batch, rows in training_stream(config, pairs, start_batch, device, config.seed):
    yield tuple(part.to(device, non_blocking=True) for part in batch[:2]) + (rows,) + tuple(
        part.to(device, non_blocking=True) for part in batch[2:])


def held_out_pair_batches(config, start_batch, device):
  """(z0, z1[, labels]) batches of the pairs in another order, for the evaluation loss."""
  shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
  pairs = reflow_pairs.PairShards(config.reflow.data_root, shape, num_classes(config))
  for batch in datasets.endless_batches(pairs, config.training.batch_size, seed=config.seed + 1,
                                        start_batch=start_batch):
    yield tuple(part.to(device, non_blocking=True) for part in batch)
