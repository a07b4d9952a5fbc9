"""Image datasets for the 256x256 models: a recursive image folder (CelebA-HQ, AFHQ, any folder) and LSUN's LMDB
export. Images are resized (shorter side) and centre-cropped to data.image_size; flips happen in training. For a
class-conditional run an image folder's classes are its top-level sub-folders; LSUN has no labels."""
import io
import os

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from datasets.registry import LabelledImages, register_dataset, wants_labels

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


def folder_classes(root, files):
  """(classes, labels) of image ``files`` lying under ``root``: an image's class is the top-level sub-folder of
  ``root`` it lies under (at any depth below it), ``classes`` the sorted names of the sub-folders that hold images
  (as torchvision's ImageFolder; a folder without images, such as the tfds backend's cache, is no class) and
  ``labels[i]`` the index of file i's class in ``classes``. An image lying directly in ``root`` is an error."""
  tops = [os.path.relpath(path, root).split(os.sep) for path in files]
  loose = [parts[0] for parts in tops if len(parts) == 1]
  if loose:
    raise ValueError(
        f'data.root={root!r} has images lying directly in it, outside any class folder ({len(loose)}: '
        f'{", ".join(loose[:3])}{", ..." if len(loose) > 3 else ""}). A class-conditional run '
        f'(model.num_classes > 0) takes the class of an image from the sub-folder of data.root it lies under: move '
        f'every image into data.root/<class name>/ (e.g. {os.path.join(root, "<class name>", loose[0])}), or use '
        f'--config.model.num_classes=0 to train unconditionally.')
  classes = sorted({parts[0] for parts in tops})
  index = {name: i for i, name in enumerate(classes)}
  return classes, [index[parts[0]] for parts in tops]


class ImageFolder(torch.utils.data.Dataset):
  """Every .jpg/.jpeg/.png/.webp file under ``root`` (recursively, sorted), as (C, S, S) images in [0, 1].

  With ``labels`` it also holds each image's class (``folder_classes``): ``classes`` and ``labels`` (one int per
  file); the files, their order and the images are the same either way.
  """

  def __init__(self, root, image_size, num_channels=3, labels=False):
    if not os.path.isdir(root):
      raise FileNotFoundError(f'data.root={root!r} is not a folder. Point --config.data.root at the folder that holds '
                              f'the images (searched recursively for {", ".join(IMAGE_EXTENSIONS)}).')
    self.files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
                        if name.lower().endswith(IMAGE_EXTENSIONS))
    if not self.files:
      raise FileNotFoundError(f'data.root={root!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}, searched '
                              f'recursively). Check the path and that the dataset was extracted there.')
    self.classes, self.labels = folder_classes(root, self.files) if labels else (None, None)
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
  """An image folder; the published 256x256 runs train and evaluate on the same images. A class-conditional run
  gets (image, label) pairs, the label given by the class sub-folder of data.root the image lies under."""
  del train
  labels = wants_labels(config)
  folder = ImageFolder(os.path.expanduser(config.data.root), config.data.image_size, config.data.num_channels,
                       labels=labels)
  return LabelledImages(folder, folder.labels, folder.classes) if labels else folder


for _name in ('IMAGE_FOLDER', 'CelebA-HQ-Pytorch', 'AFHQ-CAT-Pytorch'):
  register_dataset(_name)(build_image_folder)


@register_dataset('LSUN')
def build_lsun(config, train=True):
  """LSUN ``data.category`` from ``data.root/{category}_{train|val}_lmdb``; no class labels."""
  if wants_labels(config):
    raise ValueError(f'LSUN has no class labels (each LMDB holds one scene category), but model.num_classes='
                     f'{config.model.num_classes} asks for them. Use --config.model.num_classes=0 to train on LSUN '
                     f'unconditionally, or put images in class sub-folders and use --config.data.dataset=IMAGE_FOLDER.')
  split = 'train' if train else 'val'
  path = os.path.join(os.path.expanduser(config.data.root), f'{config.data.category}_{split}_lmdb')
  return LMDBImages(path, config.data.image_size, config.data.num_channels)
