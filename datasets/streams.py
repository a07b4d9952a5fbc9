"""The batch streams of training: this process's micro-batches of the training set (augmented, optionally held on
the device), of the held-out split, and of reflow pair shards, each in a fixed, seeded order that does not depend on
the number of processes."""
import logging
import time

import torch

import datasets
import distributed
from datasets import latents, reflow_pairs
from models import flow_shape, is_latent, num_classes


def micro_batches_of(config):
  """(rows per micro-batch, micro-batches per update) of this process (``distributed.batch_split``)."""
  micro_batch = distributed.batch_split(config.training.batch_size, config.training.grad_accum_steps)
  return micro_batch, config.training.grad_accum_steps


def rows_of(micro_step, micro_batch):
  first = distributed.chunk_offset(micro_step, micro_batch)
  return slice(first, first + micro_batch)


def resident_training_images(config, dataset, device):
  """(images, labels or None) on ``device`` when ``data.device_resident`` and the images fit in
  ``data.device_resident_max_gb`` (as uint8 for 8-bit images: CIFAR-10 takes 150 MB), else None (the loader path)."""
  data = config.data
  if not data.device_resident:
    return None
  nbytes = len(dataset) * datasets.collate([dataset[0]]).x1.numel()  # At one byte per value; float images take 4.
  if nbytes > data.device_resident_max_gb * 1e9:
    logging.info('Training images (%.1f GB as uint8) exceed data.device_resident_max_gb=%g: using the data loader',
                 nbytes / 1e9, data.device_resident_max_gb)
    return None
  started = time.time()
  images, labels = datasets.dataset_tensor(dataset, num_workers=data.num_workers)
  images, labels = images.to(device), None if labels is None else labels.to(device)
  if images.element_size() * images.numel() > data.device_resident_max_gb * 1e9:
    logging.info('Training images (%.1f GB as %s) exceed data.device_resident_max_gb=%g: using the data loader',
                 images.element_size() * images.numel() / 1e9, images.dtype, data.device_resident_max_gb)
    return None
  logging.info('Training images on %s: %s %s, %.2f GB, loaded in %.1fs', device, tuple(images.shape), images.dtype,
               images.element_size() * images.numel() / 1e9, time.time() - started)
  return images, labels


def training_stream(config, dataset, start_batch, device, seed, resident=False):
  """This process's micro-batches of every global batch from ``start_batch`` on, as ``Batch`` es with their rows.

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
    yield batch._replace(rows=rows_of(index % micro_steps, micro_batch))


def data_generator_for(config, device):
  """The generator of the training augmentations: on the device with device-resident data (no host draws)."""
  return torch.Generator(device if config.data.device_resident else 'cpu').manual_seed(config.seed)


def data_batches(config, start_batch, device, generator=None):
  """Training micro-batches ``Batch(None, x1, rows, labels)`` of the configured dataset on ``device``, augmented, in
  model space (labels: those of a class-conditional model, else None); in a latent run, latents drawn from the
  cached moments (``latents.draw_latents``)."""
  data = config.data
  latent = is_latent(config)
  dataset = latents.latent_dataset(config, train=True, device=device) if latent else datasets.get_dataset(config)
  scaler = datasets.get_data_scaler(config)
  draw = latents.latent_draw(config, augment=True) if latent else None
  micro_steps = config.training.grad_accum_steps
  replay = None
  stream = training_stream(config, dataset, start_batch, device, config.seed, resident=True)
  for index, batch in enumerate(stream):
    if generator is not None and micro_steps > 1:  # Each micro-batch slices the same global-batch draws.
      if index % micro_steps == 0:
        replay = generator.get_state()
      else:
        generator.set_state(replay)
    batch = batch.to(device, non_blocking=True)
    if latent:
      x1 = draw(batch.x1, generator=generator, global_batch=config.training.batch_size, rows=batch.rows)
    else:
      x1 = scaler(datasets.augment(batch.x1, random_flip=data.random_flip, generator=generator, rows=batch.rows,
                                   uniform_dequantization=data.uniform_dequantization,
                                   global_batch=config.training.batch_size))
    yield batch._replace(x1=x1)


def held_out_data_batches(config, start_batch, device):
  """``Batch(None, x1, labels=labels)`` of the held-out split on ``device`` in model space, not augmented (for the
  evaluation loss; a latent run's: the posterior means of the held-out images)."""
  latent = is_latent(config)
  dataset = latents.latent_dataset(config, train=False, device=device) if latent else datasets.get_dataset(
      config, train=False)
  batches = datasets.endless_batches(dataset, min(config.training.batch_size, len(dataset)), seed=config.seed + 1,
                                     start_batch=start_batch)
  scaler = latents.latent_draw(config, augment=False) if latent else datasets.get_data_scaler(config)
  for batch in batches:
    batch = batch.to(device, non_blocking=True)
    yield batch._replace(x1=scaler(batch.x1))


def pair_batches(config, start_batch, device, generator=None):
  """Training micro-batches ``Batch(z0, z1, rows, labels)`` on ``device``, read lazily from the pair shards under
  ``reflow.data_root`` (labels: those of a class-conditional teacher's pairs, else None)."""
  del generator  # Pairs are not augmented.
  shape = flow_shape(config)
  pairs = reflow_pairs.PairShards(config.reflow.data_root, shape, num_classes(config))
  for batch in training_stream(config, pairs, start_batch, device, config.seed):
    yield batch.to(device, non_blocking=True)


def held_out_pair_batches(config, start_batch, device):
  """``Batch(z0, z1, labels=labels)`` of the pairs in another order on ``device``, for the evaluation loss."""
  shape = flow_shape(config)
  pairs = reflow_pairs.PairShards(config.reflow.data_root, shape, num_classes(config))
  for batch in datasets.endless_batches(pairs, config.training.batch_size, seed=config.seed + 1,
                                        start_batch=start_batch):
    yield batch.to(device, non_blocking=True)
