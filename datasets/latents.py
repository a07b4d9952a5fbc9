"""Latent-space training (``latent.autoencoder`` set): the training images encoded once by a pretrained autoencoder
(models/autoencoder.py) into a cache, the flow trained on their latents, and its samples decoded to images.

The cache of a split, ``{latent.cache_dir or data.root/latent_cache}/{dataset}_{split}_{size}px_{signature}.npy``,
holds for image i the posterior moments (mean, log-variance) of the image and, when ``data.random_flip``, of its
mirror image:
(N, V, 2, c, h, w), V = 2 with flips, else 1, in ``latent.cache_dtype``; a class-conditional run's labels lie beside
it (``.labels.npy``). Its signature covers the source images (their files' paths, sizes and modification times, or
their bytes), the autoencoder (its config and weights), the image size, the views and the dtype: a changed source or
autoencoder gives a new cache, and an old one is never read for it. Encoding writes into ``.partial.npy`` with its
progress in ``.progress.json``: a killed run resumes where it stopped, and the cache is renamed into place once
complete.

Training draws, per image and update, one view (flip with probability 1/2) and, with ``latent.sample_posterior``,
z = mean + exp(logvar / 2) * noise (else z = mean), from the data generator over the global batch, as the pixel
augmentations do; the flow's data is x = (z - shift) * scale.
"""
import functools
import hashlib
import json
import logging
import os

import numpy as np
import torch
from tqdm import tqdm

import atomic_files
import distributed
from datasets.batch import collate
from datasets.registry import get_dataset, wants_labels
from datasets.transforms import get_data_inverse_scaler, global_rows
from models import autoencoder, is_latent

CACHE_FOLDER = 'latent_cache'
CACHE_VERSION = 1  # Part of every signature: raising it rebuilds all caches.
CACHE_DTYPES = ('float16', 'float32')
ENCODE_CHUNK = 1024  # Images per progress record while encoding.


def check_latent_config(config):
  """Raises a ValueError naming the fix for settings that have no meaning on latents."""
  if not is_latent(config):
    return
  latent = config.latent
  if latent.cache_dtype not in CACHE_DTYPES:
    raise ValueError(f'latent.cache_dtype={latent.cache_dtype!r}: use one of {list(CACHE_DTYPES)}')
  if config.data.uniform_dequantization:
    raise ValueError('data.uniform_dequantization adds noise to 8-bit pixel values; latents have none: set '
                     '--config.data.uniform_dequantization=False for a latent run')
  if config.eval.enable_bpd:
    raise ValueError('eval.enable_bpd measures the likelihood of pixels; a latent flow models latents: set '
                     '--config.eval.enable_bpd=False for a latent run')
  if 'lpips' in config.reflow.reflow_loss:
    raise ValueError(f'reflow.reflow_loss={config.reflow.reflow_loss!r} compares images, but a latent run\'s pairs '
                     f'are latents: use a loss of the latents, e.g. --config.reflow.reflow_loss=pseudo_huber')


def source_fingerprint(dataset, digest):
  """Feeds ``digest`` with what identifies the images of ``dataset``: the paths, sizes and modification times of its
  files (an image folder, an LMDB, a tfds cache), or the bytes of the array that holds them (CIFAR-10, the digits);
  any other dataset, every item's bytes (read once)."""
  files = getattr(dataset, 'files', None)
  path = getattr(dataset, 'path', None)
  if files is None and isinstance(path, str):
    files = ([os.path.join(path, name) for name in sorted(os.listdir(path))] if os.path.isdir(path) else [path])
  if files is not None:
    for name in files:
      stat = os.stat(name)
      digest.update(f'{os.path.abspath(name)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
    return
  for attribute in ('labelled', 'images'):  # Wrappers (ImagesOnly, LabelledImages): the dataset they hold.
    inner = getattr(dataset, attribute, None)
    if isinstance(inner, torch.utils.data.Dataset):
      source_fingerprint(inner, digest)
      labels = getattr(dataset, 'labels', None)
      if labels is not None:
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
      return
  array = getattr(dataset, 'data', getattr(dataset, 'images', None))
  if isinstance(array, (np.ndarray, torch.Tensor)):
    array = array.numpy() if isinstance(array, torch.Tensor) else array
    digest.update(f'{array.shape}\0{array.dtype}\n'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    targets = getattr(dataset, 'targets', None)  # torchvision's labels of those images.
    if targets is not None:
      digest.update(np.asarray(targets, dtype=np.int64).tobytes())
    return
  for index in range(len(dataset)):
    item = dataset[index]
    image = item[0] if isinstance(item, (tuple, list)) else item
    digest.update(image.numpy().tobytes())


def source_signature(dataset):
  """sha256 hex digest of ``source_fingerprint(dataset)``."""
  digest = hashlib.sha256()
  source_fingerprint(dataset, digest)
  return digest.hexdigest()


def cache_folder(config):
  """``latent.cache_dir``, or ``data.root/latent_cache``."""
  return os.path.expanduser(config.latent.cache_dir or os.path.join(config.data.root, CACHE_FOLDER))


def cache_path(config, dataset, split, vae):
  """(path, views) of the cache of ``split`` ('train' or 'test') of ``dataset`` encoded by ``vae``."""
  data, latent = config.data, config.latent
  views = 2 if data.random_flip and split == 'train' else 1
  digest = hashlib.sha256(f'{CACHE_VERSION}\0{data.dataset}\0{split}\0{data.image_size}\0{data.num_channels}\0'
                          f'{views}\0{latent.cache_dtype}\0{vae.signature()}\n'.encode())
  digest.update(source_signature(dataset).encode())
  name = f'{data.dataset.lower()}_{split}_{data.image_size}px_{digest.hexdigest()[:16]}.npy'
  return os.path.join(cache_folder(config), name), views


def _labels_path(path):
  return path[:-len('.npy')] + '.labels.npy'


def encode_split(dataset, path, views, vae, dtype, labelled, num_workers=0):
  """Encodes every image of ``dataset`` (and its mirror image when ``views`` = 2) into the (N, V, 2, c, h, w) cache
  ``path``, resuming a partial file of an earlier run; atomic: the finished cache appears under ``path`` only."""
  partial, progress_path = path[:-len('.npy')] + '.partial.npy', path[:-len('.npy')] + '.progress.json'
  probe = dataset[0]
  probe = probe[0] if isinstance(probe, (tuple, list)) else probe
  moments_shape = tuple(vae.encode(probe[None]).shape[1:])  # (2, c, h, w)
  shape = (len(dataset), views, *moments_shape)
  done = 0
  if os.path.exists(partial) and os.path.exists(progress_path):
    with open(progress_path, encoding='utf-8') as handle:
      progress = json.load(handle)
    if progress.get('shape') == list(shape):
      done = progress['done']
  partial_labels = partial[:-len('.npy')] + '.labels.npy'
  if done:
    array = np.lib.format.open_memmap(partial, mode='r+')
    labels = np.lib.format.open_memmap(partial_labels, mode='r+') if labelled else None
    logging.info('Resuming the latent cache %s at image %d of %d', path, done, shape[0])
  else:
    array = np.lib.format.open_memmap(partial, mode='w+', dtype=dtype, shape=shape)
    labels = np.lib.format.open_memmap(partial_labels, mode='w+', dtype=np.int64, shape=shape[:1]) if labelled else None
    logging.info('Encoding %d images (%d view%s each) into the latent cache %s', shape[0], views,
                 's' if views > 1 else '', path)
  indices = list(range(done, shape[0]))
  loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=ENCODE_CHUNK,
                                       num_workers=num_workers, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(0))
  for batch in tqdm(loader, desc='latent cache', dynamic_ncols=True, initial=done // ENCODE_CHUNK,
                    total=-(-shape[0] // ENCODE_CHUNK)):
    images = batch.x1
    encoded = [vae.encode(images)]
    if views == 2:
      encoded.append(vae.encode(images.flip(-1)))
    array[done:done + images.shape[0]] = torch.stack(encoded, dim=1).cpu().numpy().astype(dtype)
    if labels is not None:
      labels[done:done + images.shape[0]] = batch.labels.numpy()
      labels.flush()
    array.flush()
    done += images.shape[0]
    atomic_files.write_json(progress_path, {'shape': list(shape), 'done': done})
  del array
  if labels is not None:
    del labels
    os.replace(partial_labels, _labels_path(path))  # Before the cache is renamed into place.
  os.replace(partial, path)
  atomic_files.sync_folder(os.path.dirname(path))
  os.remove(progress_path)
  return path


class LatentMoments(torch.utils.data.Dataset):
  """The cache's items, memory-mapped: float32 (V, 2, c, h, w) moments, or (moments, label) pairs with labels."""

  def __init__(self, path, labels=None, classes=None):
    self.path = path
    self.shape = np.load(path, mmap_mode='r', allow_pickle=False).shape
    self.labels, self.classes = labels, classes
    self._array = None

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, index):
    if self._array is None:  # Mapped lazily, once per data-loader worker.
      self._array = np.load(self.path, mmap_mode='r', allow_pickle=False)
    moments = torch.from_numpy(np.array(self._array[index], dtype=np.float32))
    return moments if self.labels is None else (moments, int(self.labels[index]))

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_array'] = None
    return state


def latent_dataset(config, train=True, device=None):
  """The ``LatentMoments`` of the training (``train``) or held-out split, encoded first where its cache is missing
  (by rank 0 under torchrun, the other processes waiting). A held-out split of the training images themselves (the
  image folders) is the training cache, whose first view held-out batches read."""
  split = 'train' if train else 'test'
  dataset = get_dataset(config, train=train)
  if not train and source_signature(dataset) == source_signature(get_dataset(config, train=True)):
    return latent_dataset(config, train=True, device=device)
  device = device or distributed.initialize(config.device)
  vae = autoencoder.load_autoencoder(config.latent, device, config.latent.encode_batch_size)
  path, views = cache_path(config, dataset, split, vae)
  with distributed.main_process_first():
    if not os.path.exists(path) and distributed.is_main_process():
      os.makedirs(os.path.dirname(path), exist_ok=True)
      encode_split(dataset, path, views, vae, config.latent.cache_dtype, wants_labels(config),
                   num_workers=config.data.num_workers)
  labels = np.load(_labels_path(path), allow_pickle=False) if wants_labels(config) else None
  return LatentMoments(path, labels, getattr(dataset, 'classes', None) if labels is not None else None)


def _draws(generator, device, draw):
  """``shape -> draw(shape, generator, device)`` on the generator's device (``device`` without one)."""
  where = device if generator is None else generator.device
  return lambda shape: draw(shape, generator=generator, device=where)


def draw_latents(moments, scale, shift, *, augment=True, sample_posterior=True, generator=None, global_batch=None,
                 rows=slice(None)):
  """(B, V, 2, c, h, w) cached moments -> (B, c, h, w) data of the flow, x = (z - shift) * scale.

  With ``augment`` (training) each row takes its mirror view with probability 1/2 (when cached) and, with
  ``sample_posterior``, z = mean + exp(logvar / 2) * noise; the draws are made for the ``global_batch`` and sliced
  to ``rows``, as ``transforms.augment`` does. Without it (held-out batches): the first view's mean.
  """
  global_batch = global_batch or moments.shape[0]
  chosen = moments[:, 0]  # (B, 2, c, h, w)
  if augment and moments.shape[1] == 2:
    flip = global_rows(_draws(generator, moments.device, torch.rand), (global_batch,), rows).to(moments.device)
    chosen = torch.where(flip.lt(0.5).reshape(-1, 1, 1, 1, 1), moments[:, 1], chosen)
  mean, logvar = chosen[:, 0], chosen[:, 1]  # (B, c, h, w) each
  latents = mean
  if augment and sample_posterior:
    noise = global_rows(_draws(generator, moments.device, torch.randn), (global_batch, *mean.shape[1:]), rows)
    latents = mean + torch.exp(0.5 * logvar) * noise.to(moments.device)
  return autoencoder.latent_to_model(latents, scale, shift)


def latent_draw(config, augment):
  """``draw_latents`` with the run's factors and ``latent.sample_posterior``: moments -> the flow's data."""
  scale, shift = autoencoder.latent_factors(config.latent)
  return functools.partial(draw_latents, scale=scale, shift=shift, augment=augment,
                           sample_posterior=config.latent.sample_posterior)


def latent_settings(config):
  """What a latent run's samples also depend on (for the manifests of sample rounds): the autoencoder and the
  factors; {} in pixel space."""
  if not is_latent(config):
    return {}
  scale, shift = autoencoder.latent_factors(config.latent)
  return {'autoencoder': config.latent.autoencoder, 'autoencoder_subfolder': config.latent.subfolder,
          'latent_scale': scale, 'latent_shift': shift}


def model_to_images(config, device):
  """The map from the flow's space to [0, 1] images: the inverse data scaler, or for a latent run x -> z = x / scale +
  shift decoded by the autoencoder (loaded on ``device`` at the first call)."""
  if not is_latent(config):
    inverse_scaler = get_data_inverse_scaler(config)
    return lambda x: inverse_scaler(x).clamp(0.0, 1.0)
  scale, shift = autoencoder.latent_factors(config.latent)
  loaded = []  # The autoencoder, loaded at the first call.

  def decode(x):
    if not loaded:
      loaded.append(autoencoder.load_autoencoder(config.latent, device, config.latent.encode_batch_size))
    return loaded[0].decode(autoencoder.model_to_latent(x, scale, shift))

  return decode
