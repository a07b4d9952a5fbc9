"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), upscaled for the demo."""
import torch
import torch.nn.functional as F

from datasets.registry import register_dataset

# Held-out split: every DIGITS_EVAL_EVERY-th image is kept for evaluation losses.
DIGITS_EVAL_EVERY = 10


def load_digit_images(image_size=16):
  """All 1,797 digits as float images in [0, 1], (N, 1, image_size, image_size), bilinearly upscaled."""
  from sklearn.datasets import load_digits

  images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8), 0..16 -> [0, 1]
  if image_size != 8:
    images = F.interpolate(images, size=(image_size, image_size), mode='bilinear', align_corners=False)
  return images.clamp(0.0, 1.0)


class TensorImages(torch.utils.data.Dataset):
  """Images held in one (N, C, H, W) tensor."""

  def __init__(self, images):
    self.images = images

  def __len__(self):
    return self.images.shape[0]

  def __getitem__(self, index):
    return self.images[index]


@register_dataset('DIGITS')
def build_digits(config, train=True):
  if config.data.num_channels != 1:
    raise ValueError(f'The DIGITS dataset has 1 channel, but data.num_channels={config.data.num_channels}')
  images = load_digit_images(config.data.image_size)
  held_out = torch.arange(images.shape[0]) % DIGITS_EVAL_EVERY == 0
  return TensorImages(images[~held_out] if train else images[held_out])
