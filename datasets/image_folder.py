"""Image datasets for the 256x256 models: a recursive image folder (CelebA-HQ, AFHQ, any folder) and LSUN's LMDB
export. Images are resized (shorter side) and centre-cropped to data.image_size; flips happen in training."""
import io
import os

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from datasets.registry import register_dataset

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')


def image_transform(image_size):
  """Shorter side to ``image_size`` (antialiased bicubic), centre crop, float tensor in [0, 1]."""
  return transforms.Compose([
      transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
      transforms.CenterCrop(image_size),
      transforms.ToTensor(),
  ])


def decode_image(source, mode, where):
  """PIL image in ``mode`` from a path or bytes; an unreadable image is an error that names it."""
  try:
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
      return image.convert(mode)
  except (OSError, UnidentifiedImageError, ValueError) as error:
    raise ValueError(f'Cannot read the image {where} ({error}). Remove or replace the file, then run again.') from error


class ImageFolder(torch.utils.data.Dataset):
  """Every .jpg/.jpeg/.png/.webp file under ``root`` (recursively, sorted), as (C, S, S) images in [0, 1]."""

  def __init__(self, root, image_size, num_channels=3):
    if not os.path.isdir(root):
      raise FileNotFoundError(f'data.root={root!r} is not a folder. Point --config.data.root at the folder that holds '
                              f'the images (searched recursively for {", ".join(IMAGE_EXTENSIONS)}).')
    self.files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                        if name.lower().endswith(IMAGE_EXTENSIONS))
    if not self.files:
      raise FileNotFoundError(f'data.root={root!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}, searched '
                              f'recursively). Check the path and that the dataset was extracted there.')
    self.mode = 'L' if num_channels == 1 else 'RGB'
    self.transform = image_transform(image_size)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    path = self.files[index]
    return self.transform(decode_image(path, self.mode, repr(path)))


class LMDBImages(torch.utils.data.Dataset):
  """The images of an LSUN-style LMDB (values are encoded images), as (C, S, S) tensors in [0, 1]."""

  def __init__(self, path, image_size, num_channels=3):
    import lmdb

    if not os.path.isdir(path):
      raise FileNotFoundError(f'The LMDB folder {path!r} does not exist. Export LSUN with its official tools and set '
                              f'--config.data.root to the folder holding {os.path.basename(path)}.')
    self.path = path
    env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    with env.begin(write=False) as transaction:
      self.keys = [key for key, _ in transaction.cursor()]
    env.close()
    if not self.keys:
      raise FileNotFoundError(f'The LMDB {path!r} holds no images.')
    self.mode = 'L' if num_channels == 1 else 'RGB'
    self.transform = image_transform(image_size)
    self._env = None

  def __len__(self):
    return len(self.keys)

  def __getitem__(self, index):
    import lmdb

    if self._env is None:  # Opened lazily, once per data-loader worker.
      self._env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, meminit=False)
    with self._env.begin(write=False) as transaction:
      value = transaction.get(self.keys[index])
    return self.transform(decode_image(value, self.mode, f'{self.keys[index]!r} in {self.path}'))

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_env'] = None  # LMDB handles do not cross process boundaries.
    return state


def build_image_folder(config, train=True):
  """An image folder; the published 256x256 runs train and evaluate on the same images."""
  del train
  return ImageFolder(os.path.expanduser(config.data.root), config.data.image_size, config.data.num_channels)


for _name in ('IMAGE_FOLDER', 'CelebA-HQ-Pytorch', 'AFHQ-CAT-Pytorch'):
  register_dataset(_name)(build_image_folder)


@register_dataset('LSUN')
def build_lsun(config, train=True):
  """LSUN ``data.category`` from ``data.root/{category}_{train|val}_lmdb``."""
  split = 'train' if train else 'val'
  path = os.path.join(os.path.expanduser(config.data.root), f'{config.data.category}_{split}_lmdb')
  return LMDBImages(path, config.data.image_size, config.data.num_channels)
