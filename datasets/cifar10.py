"""CIFAR-10 through torchvision, downloaded only on request (``data.download=True``)."""
import os

import torch
from torchvision import datasets as tv_datasets
from torchvision import transforms

from datasets.registry import register_dataset, wants_labels

# The class names in label order, as in the archive's batches.meta and tfds's cifar10.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


class ImagesOnly(torch.utils.data.Dataset):
  """The images of a labelled dataset (torchvision's yields (image, label); an unconditional run wants images)."""

  def __init__(self, labelled):
    self.labelled = labelled

  def __len__(self):
    return len(self.labelled)

  def __getitem__(self, index):
    return self.labelled[index][0]


def check_cifar10_shape(data):
  if data.num_channels != 3 or data.image_size != 32:
    raise ValueError(f'CIFAR10 images are 3x32x32, but data.num_channels={data.num_channels} and '
                     f'data.image_size={data.image_size}')


@register_dataset('CIFAR10')
def build_cifar10(config, train=True):
  """torchvision's CIFAR-10 ``train`` or test split: its images, or for a class-conditional run its (image, label)
  pairs as torchvision yields them (``classes``: the 10 names of batches.meta)."""
  data = config.data
  check_cifar10_shape(data)
  root = os.path.expanduser(data.root)
  try:
    labelled = tv_datasets.CIFAR10(root=root, train=train, download=data.download, transform=transforms.ToTensor())
    return labelled if wants_labels(config) else ImagesOnly(labelled)
  except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
    raise FileNotFoundError(
        f'CIFAR-10 was not found under {os.path.abspath(root)!r} ({error}). Either pass '
        f'--config.data.download=True to download it there (about 170 MB), or place the extracted '
        f"'cifar-10-batches-py' folder of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz inside it, "
        f'or point --config.data.root at the folder that holds it.') from error
  except OSError as error:  # Download failed: offline, DNS, refused connection.
    raise ConnectionError(
        f'Downloading CIFAR-10 into {os.path.abspath(root)!r} failed ({error}). On an offline machine, copy '
        f"cifar-10-python.tar.gz (or its extracted 'cifar-10-batches-py' folder) into that folder and run "
        f'again with --config.data.download=False.') from error
