"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), upscaled for the demo."""
import torch
import torch.nn.functional as F

from datasets.registry import LabelledImages, register_dataset, wants_labels

# Held-out split: every DIGITS_EVAL_EVERY-th image is kept for evaluation losses.
DIGITS_EVAL_EVERY = 10


def load_digit_images(image_size=16):
  """All 1,797 digits as float images in [0, 1], (N, 1, image_size, image_size), bilinearly upscaled."""
  from sklearn.datasets import load_digits

  images = torch.from_numpy(load_digits().images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8), 0..16 -> [0, 1]
  if image_size != 8:
    images = F.interpolate(images, size=(image_size, image_size), mode='bilinear', align_corners=False)
  return images.clamp(0.0, 1.0)


def load_digit_labels():
  """The digit (0-9) shown by each image of ``load_digit_images``, (N,) int64."""
  from sklearn.datasets import load_digits

  return torch.from_numpy(load_digits().target).long()


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
  """The training split (9 of every 10 digits) or the held-out one (every DIGITS_EVAL_EVERY-th); labelled by the
  digit they show (classes '0'..'9') for a class-conditional run."""
  if config.data.num_channels != 1:
    raise ValueError(f'The DIGITS dataset has 1 channel, but data.num_channels={config.data.num_channels}')
  images = load_digit_images(config.data.image_size)
  held_out = torch.arange(images.shape[0]) % DIGITS_EVAL_EVERY == 0
  split = ~held_out if train else held_out
  if wants_labels(config):
    return LabelledImages(TensorImages(images[split]), load_digit_labels()[split], [str(d) for d in range(10)])
  return TensorImages(images[split])
