"""Scaling between [0, 1] images and model space, and the training-time augmentations of a batch."""
import torch


def get_data_scaler(config):
  """[0, 1] -> [-1, 1] when ``data.centered``, else the identity."""
  if config.data.centered:
    return lambda x: x * 2.0 - 1.0
  return lambda x: x


def get_data_inverse_scaler(config):
  """The inverse of ``get_data_scaler``: model space -> [0, 1]."""
  if config.data.centered:
    return lambda x: (x + 1.0) / 2.0
  return lambda x: x


def global_rows(draw, shape, rows):
  """``draw(shape)`` for the whole global batch, then this process's ``rows`` (a slice): the same random numbers
  reach every row whatever the number of processes and micro-batches the batch is split into."""
  return draw(shape)[rows]


def _uniform(generator):
  return lambda shape: torch.rand(shape, generator=generator, device=generator.device if generator else None)


def random_horizontal_flip(images, generator=None, global_batch=None, rows=slice(None)):
  """Flips each image of (B, C, H, W) left-right with probability 1/2."""
  flip = global_rows(_uniform(generator), (global_batch or images.shape[0],), rows)
  flip = flip.to(images.device).lt(0.5).reshape(-1, 1, 1, 1)
  return torch.where(flip, images.flip(-1), images)


def uniform_dequantize(images, generator=None, global_batch=None, rows=slice(None)):
  """(255 x + u) / 256 with u ~ U[0, 1): turns 8-bit images in [0, 1] into a continuous density."""
  noise = global_rows(_uniform(generator), (global_batch or images.shape[0], *images.shape[1:]), rows)
  return (images * 255.0 + noise.to(images.device)) / 256.0


def augment(images, *, random_flip, uniform_dequantization, generator=None, global_batch=None, rows=slice(None)):
  """The training augmentations of a [0, 1] batch, drawn from ``generator`` so that resumed runs repeat them.

  Under data parallelism ``images`` are ``rows`` of a global batch of ``global_batch``: the draws are made for the
  global batch and sliced, so each image gets the same flip and noise as in a single-process run.
  """
  if random_flip:
    images = random_horizontal_flip(images, generator, global_batch, rows)
  if uniform_dequantization:
    images = uniform_dequantize(images, generator, global_batch, rows)
  return images
