"""``data.backend='tfds'``: CIFAR-10 through tensorflow-datasets and the image folders through tf.data, the same
images and [0, 1] scaling as the torchvision backend.

TensorFlow never enters this process (it crashes next to torch): a TensorFlow-only child, datasets/tfds_export.py,
reads and decodes the images and streams them here once. This process resizes and centre-crops them with the
torchvision backend's own transform (image folders) and writes them, uint8 (N, H, W, C), into one .npy cache under
``data.root/tfds_cache/`` (temporary file, renamed when complete). Later runs memory-map that file and start no
child. The cache name carries a signature of the source files (paths, sizes, modification times), so a changed
source makes a new cache, and an old one is never read for it.

Class labels (class-conditional runs): CIFAR-10's come from the child with the images and are kept beside their
image cache, int64 (N,) in ``<cache name>.labels.npy`` (a cache written before labels were exported is rebuilt when
a run first asks for them); an image folder's come from its file paths (``image_folder.folder_classes``).
"""
import hashlib
import importlib.util
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import atomic_files
from datasets import image_folder, tfds_export
from datasets.cifar10 import CIFAR10_CLASSES, check_cifar10_shape
from datasets.registry import LabelledImages, register_dataset, wants_labels

EXPORT_SCRIPT = os.path.abspath(tfds_export.__file__)
CACHE_FOLDER = 'tfds_cache'
CACHE_VERSION = 1  # Part of every signature: raising it rebuilds all caches.
CIFAR10_SHAPE = (32, 32, 3)  # (H, W, C)


def tfds_available():
  """Whether the child can import tensorflow-datasets, checked without importing TensorFlow here."""
  return all(importlib.util.find_spec(name) is not None for name in ('tensorflow', 'tensorflow_datasets'))


def require_tfds():
  if not tfds_available():
    raise ImportError("data.backend='tfds' needs TensorFlow and tensorflow-datasets: pip install -r "
                      "requirements-tf.txt (or use the default --config.data.backend=torchvision)")


class CachedImages(torch.utils.data.Dataset):
  """uint8 (N, H, W, C) images of a .npy file, memory-mapped, as float (C, H, W) tensors x / 255 in [0, 1]."""

  def __init__(self, path):
    self.path = path
    self.shape = np.load(path, mmap_mode='r', allow_pickle=False).shape
    self._images = None

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, index):
    if self._images is None:  # Mapped lazily, once per data-loader worker.
      self._images = np.load(self.path, mmap_mode='r', allow_pickle=False)
    image = torch.from_numpy(np.array(self._images[index]))  # (H, W, C) uint8
    return image.permute(2, 0, 1).contiguous().float().div(255)  # The arithmetic of torchvision's ToTensor.

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_images'] = None  # Each worker maps the file itself.
    return state


def files_signature(paths, base, extra=''):
  """16 hex digits of sha256 over (path relative to ``base``, size, mtime) of each file, ``extra`` and the cache
  version: any added, removed or rewritten file changes it."""
  digest = hashlib.sha256(f'{CACHE_VERSION}\0{extra}\n'.encode())
  for path in paths:
    stat = os.stat(path)
    digest.update(f'{os.path.relpath(path, base)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()[:16]


def labels_path_of(cache_path):
  """The labels file kept beside the image cache ``cache_path`` (same name and signature)."""
  return cache_path[:-len('.npy')] + '.labels.npy'


def read_exact(stream, size):
  data = stream.read(size)
  return data if len(data) == size else None


def child_failure(process, errors, missing_hint):
  """The exception for a child that stopped early: its reason (last stderr line after ERROR_PREFIX) and a fix."""
  status = process.wait()
  errors.seek(0)
  text = errors.read().decode('utf-8', 'replace')
  reasons = [line[len(tfds_export.ERROR_PREFIX):] for line in text.splitlines()
             if line.startswith(tfds_export.ERROR_PREFIX)]
  if status == tfds_export.EXIT_MISSING and reasons:
    return FileNotFoundError(f'{reasons[-1]}. {missing_hint}')
  if status == tfds_export.EXIT_UNREADABLE and reasons:
    return ValueError(f'{reasons[-1]}. Remove or replace it, then run again.')
  return RuntimeError(f'The tfds export child process ({EXPORT_SCRIPT}) failed with exit status {status}:\n'
                      f'{text[-3000:]}')


def build_cache(arguments, cache_path, image_shape, convert=None, missing_hint='', labels=False):
  """Runs ``tfds_export.py *arguments`` and writes its images, each passed through ``convert`` ((H, W, C) uint8 ->
  ``image_shape`` uint8), to the (N, *image_shape) uint8 .npy file ``cache_path()`` atomically; returns its path.
  With ``labels`` (a command whose stream ends with the labels) they go to ``labels_path_of(path)``, (N,) int64.

  ``cache_path`` is called once the child has read its source (CIFAR-10 is then prepared), so that the name can
  carry the signature of the files it was read from. Other caches of the same kind (same name up to the
  signature), and their labels, are deleted afterwards.
  """
  record_size = struct.calcsize(tfds_export.RECORD_FORMAT)
  item_size = int(np.prod(image_shape))
  with tempfile.TemporaryFile() as errors:
    process = subprocess.Popen([sys.executable, EXPORT_SCRIPT, *arguments], stdout=subprocess.PIPE, stderr=errors,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    try:
      header = read_exact(process.stdout, struct.calcsize(tfds_export.COUNT_FORMAT))
      if header is None:
        raise child_failure(process, errors, missing_hint)
      (count,) = struct.unpack(tfds_export.COUNT_FORMAT, header)
      path = cache_path()
      if path is None:
        raise RuntimeError(f'The tfds export of {arguments} left no source files to sign; run again')
      logging.info('Writing %d images read through TensorFlow into %s', count, path)
      seen = np.zeros(count, dtype=bool)
      with atomic_files.atomic_open(path) as handle:
        np.lib.format.write_array_header_1_0(handle, {'descr': '|u1', 'fortran_order': False,
                                                      'shape': (count, *image_shape)})
        offset = handle.tell()
        handle.truncate(offset + count * item_size)
        for _ in tqdm(range(count), desc='tfds cache', dynamic_ncols=True):
          record = read_exact(process.stdout, record_size)
          if record is None:
            raise child_failure(process, errors, missing_hint)
          index, *shape = struct.unpack(tfds_export.RECORD_FORMAT, record)
          pixels = read_exact(process.stdout, int(np.prod(shape)))
          if pixels is None:
            raise child_failure(process, errors, missing_hint)
          image = np.frombuffer(pixels, dtype=np.uint8).reshape(shape)  # (H, W, C)
          if convert is not None:
            image = convert(image)
          if image.shape != tuple(image_shape) or not 0 <= index < count or seen[index]:
            raise RuntimeError(f'The tfds export sent image {index} of shape {image.shape} (expected one image per '
                               f'index in [0, {count}) of shape {tuple(image_shape)})')
          seen[index] = True
          handle.seek(offset + index * item_size)
          handle.write(image.tobytes())
        if labels:
          stream_labels = read_exact(process.stdout, count * struct.calcsize(tfds_export.LABEL_FORMAT))
          if stream_labels is None:
            raise child_failure(process, errors, missing_hint)
        if process.wait() != 0:
          raise child_failure(process, errors, missing_hint)
        if labels:
          with atomic_files.atomic_open(labels_path_of(path)) as labels_handle:  # Before its images are renamed.
            np.save(labels_handle, np.frombuffer(stream_labels, dtype='<i8').astype(np.int64))
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
      process.stdout.close()
  prefix = os.path.basename(path).rsplit('_', 1)[0] + '_'
  current = {os.path.basename(path), os.path.basename(labels_path_of(path))}
  for name in os.listdir(os.path.dirname(path)):
    if name.startswith(prefix) and name.endswith('.npy') and name not in current:
      os.remove(os.path.join(os.path.dirname(path), name))  # A cache of an earlier version of the source.
  return path


def cifar10_missing_hint(root):
  return (f'data.backend=tfds reads CIFAR-10 with tfds.builder("cifar10", data_dir={root!r}): place a prepared tfds '
          f'cifar10 there ({root}/cifar10/<version>/, e.g. copied from ~/tensorflow_datasets), or the official '
          f'{tfds_export.CIFAR10_URL} as {root}/{tfds_export.CIFAR10_ARCHIVE} (the binary version: the python '
          f'version of the torchvision backend does not serve), or pass --config.data.download=True to let tfds '
          f'download it, or point --config.data.root at the folder that holds it')


def tfds_cifar10(root, split, download=False, labels=False):
  """CIFAR-10 ``split`` ('train' or 'test') read by tensorflow-datasets from ``root``, in the archive's order; with
  ``labels``, (image, label) pairs (``classes``: CIFAR10_CLASSES)."""
  require_tfds()
  root = os.path.abspath(root)
  prepared = os.path.join(root, 'cifar10')

  def cache_path():
    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(prepared) for name in names)
    if not files:
      return None
    return os.path.join(root, CACHE_FOLDER, f'cifar10_{split}_32px_3ch_{files_signature(files, root, split)}.npy')

  path = cache_path()
  if path is None or not os.path.isfile(path) or (labels and not os.path.isfile(labels_path_of(path))):
    if path is None and not download and not os.path.isfile(os.path.join(root, tfds_export.CIFAR10_ARCHIVE)):
      raise FileNotFoundError(f'CIFAR-10 was not found under {root!r}. {cifar10_missing_hint(root)}.')
    path = build_cache(['cifar10', root, split, '1' if download else '0'], cache_path, CIFAR10_SHAPE,
                       missing_hint=cifar10_missing_hint(root), labels=True)
  if not labels:
    return CachedImages(path)
  return LabelledImages(CachedImages(path), np.load(labels_path_of(path), allow_pickle=False), CIFAR10_CLASSES)


def tfds_image_folder(root, image_size, num_channels=3, labels=False):
  """The images of ``image_folder.ImageFolder(root, ...)`` (same files, same order), decoded by TensorFlow, then
  resized and centre-cropped by that class's own transform; with ``labels``, (image, label) pairs whose label is
  the class sub-folder of ``root`` (``image_folder.folder_classes``; the cache is the same either way)."""
  require_tfds()
  root = os.path.abspath(root)
  # Checks the folder (and, with labels, the class folders); the sorted recursive list.
  listing = image_folder.ImageFolder(root, image_size, num_channels, labels=labels)
  signature = files_signature(listing.files, root, f'{image_size} {num_channels}')
  path = os.path.join(root, CACHE_FOLDER, f'image_folder_{image_size}px_{num_channels}ch_{signature}.npy')

  def convert(rgb):  # (H, W, 3) uint8 -> (S, S, C) uint8, by the torchvision backend's PIL transform.
    tensor = listing.transform(Image.fromarray(rgb, 'RGB').convert(listing.mode))  # (C, S, S), k / 255
    return tensor.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()

  if not os.path.isfile(path):
    with tempfile.TemporaryDirectory() as folder:
      list_path = os.path.join(folder, 'files.json')
      with open(list_path, 'w', encoding='utf-8') as handle:
        json.dump(listing.files, handle)
      build_cache(['files', list_path], lambda: path, (image_size, image_size, num_channels), convert)
  return LabelledImages(CachedImages(path), listing.labels, listing.classes) if labels else CachedImages(path)


@register_dataset('CIFAR10', backend='tfds')
def build_tfds_cifar10(config, train=True):
  check_cifar10_shape(config.data)
  return tfds_cifar10(os.path.expanduser(config.data.root), 'train' if train else 'test', config.data.download,
                      labels=wants_labels(config))


def build_tfds_image_folder(config, train=True):
  """An image folder; as with the torchvision backend, training and evaluation use the same images, and a
  class-conditional run gets (image, label) pairs labelled by class sub-folder."""
  del train
  data = config.data
  return tfds_image_folder(os.path.expanduser(data.root), data.image_size, data.num_channels,
                           labels=wants_labels(config))


for _name in ('IMAGE_FOLDER', 'CelebA-HQ-Pytorch', 'AFHQ-CAT-Pytorch'):
  register_dataset(_name, backend='tfds')(build_tfds_image_folder)
