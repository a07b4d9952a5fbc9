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


def random_horizontal_flip(images, generator=None):
  """Flips each image of (B, C, H, W) left-right with probability 1/2."""
  flip = torch.rand(images.shape[0], generator=generator, device=generator.device if generator else None)
  flip = flip.to(images.device).lt(0.5).reshape(-1, 1, 1, 1)
  return torch.where(flip, images.flip(-1), images)


def uniform_dequantize(images, generator=None):
  """(255 x + u) / 256 with u ~ U[0, 1): turns 8-bit images in [0, 1] into a continuous density."""
  noise = torch.rand(images.shape, generator=generator, device=generator.device if generator else None)
  return (images * 255.0 + noise.to(images.device)) / 256.0


def augment(images, *, random_flip, uniform_dequantization, generator=None):
  """The training augmentations of a [0, 1] batch, drawn from ``generator`` so that resumed runs repeat them."""
  if random_flip:
    images = random_horizontal_flip(images, generator)
  if uniform_dequantization:
    images = uniform_dequantize(images, generator)
  return images
