"""Reflow pairs (z0, z1 = ODE(z0)) on disk: shards written atomically, read lazily, resumable, never mixed.

Layout: ``data_root/seed_{seed}/manifest.json`` and ``shard_{i:06d}.npy``, one folder per generation seed (runs
with different seeds can generate in parallel). Pair j of a seed has the noise z0 of seed (seed, j), so every
pair is reproducible. Two storage formats:
  - 'float32': the published layout, z0 and z1 in float32, shard array (2, N, C, H, W);
  - 'compact': z1 in float16, shard array (N, C, H, W); z0 is regenerated from its seed when read.
Shards are memory-mapped when read, so training never loads all pairs into memory. Each finished shard has a record
``shard_{i:06d}.json`` (its pairs and NFE) written after it; the manifest collects them, so processes of a torchrun
job can write disjoint shards of one folder. Pairs of a class-conditional teacher (manifest ``num_classes`` > 0)
carry the label each z1 was generated for, in ``shard_{i:06d}_labels.npy`` (int64 (N,), written before the shard),
in either format.
"""
import bisect
import json
import os
import shutil

import numpy as np
import torch

import atomic_files
from datasets.batch import Batch
from rectified_flow_pytorch import flow_math

PAIR_FORMATS = ('float32', 'compact')


def bytes_per_pair(pair_format, shape):
  elements = int(np.prod(shape))
  return elements * (2 * 4 if pair_format == 'float32' else 2)


class PairShardWriter:
  """Writes the shards of one seed folder; ``missing_shards()`` tells a resumed run what is left to make."""

  def __init__(self, data_root, seed, settings, total_pairs, pairs_per_shard, clean_temporary=True):
    if settings['pair_format'] not in PAIR_FORMATS:
      raise ValueError(f"Unknown reflow.pair_format {settings['pair_format']!r}; valid: {list(PAIR_FORMATS)}")
    self.folder = os.path.join(data_root, f'seed_{seed}')
    os.makedirs(self.folder, exist_ok=True)
    for name in os.listdir(self.folder) if clean_temporary else ():  # Half-written files of a killed run.
      if '.tmp-' in name:
        os.remove(os.path.join(self.folder, name))
    self.seed, self.total_pairs, self.pairs_per_shard = seed, total_pairs, pairs_per_shard
    self.manifest_path = os.path.join(self.folder, 'manifest.json')
    self.settings = json.loads(json.dumps({**settings, 'seed': seed, 'pairs_per_shard': pairs_per_shard}))
    if os.path.exists(self.manifest_path):
      with open(self.manifest_path, encoding='utf-8') as handle:
        existing = json.load(handle)
      changed = sorted(k for k in self.settings if existing.get(k) != self.settings[k])
      if changed:
        details = ', '.join(f'{k}: {existing.get(k)!r} there, {self.settings[k]!r} now' for k in changed)
        raise ValueError(f'{self.folder} holds pairs made with other settings ({details}). Use another '
                         f'reflow.data_root or seed, or delete the folder to start over.')
      self.manifest = existing
    else:
      self.manifest = {**self.settings, 'shards': {}}
    self.manifest['total_number_of_samples'] = total_pairs
    self.refresh_manifest()

  @property
  def num_shards(self):
    return -(-self.total_pairs // self.pairs_per_shard)

  def shard_path(self, index):
    return os.path.join(self.folder, f'shard_{index:06d}.npy')

  def shard_range(self, index):
    first = index * self.pairs_per_shard
    return first, min(self.pairs_per_shard, self.total_pairs - first)

  def record_path(self, index):
    return os.path.join(self.folder, f'shard_{index:06d}.json')

  def missing_shards(self):
    return [i for i in range(self.num_shards) if not (os.path.exists(self.shard_path(i)) and (
        os.path.exists(self.record_path(i)) or str(i) in self.manifest['shards']))]

  def refresh_manifest(self):
    """Collects the records of the finished shards (from every process) into the manifest, atomically."""
    for index in range(self.num_shards):
      if os.path.exists(self.shard_path(index)) and os.path.exists(self.record_path(index)):
        with open(self.record_path(index), encoding='utf-8') as handle:
          self.manifest['shards'][str(index)] = json.load(handle)
    if self.manifest['shards']:
      nfes = [s['nfe'] for s in self.manifest['shards'].values()]
      self.manifest['count'] = sum(s['count'] for s in self.manifest['shards'].values())
      self.manifest['nfe'] = {'mean': float(np.mean(nfes)), 'min': int(min(nfes)), 'max': int(max(nfes))}
      self.manifest['bytes_per_pair'] = bytes_per_pair(self.settings['pair_format'], self.settings['image_shape'])
    atomic_files.write_json(self.manifest_path, self.manifest)

  def check_free_disk(self):
    """Refuses to start when the remaining shards would not fit on the disk."""
    shape = self.settings['image_shape']
    needed = sum(self.shard_range(i)[1] for i in self.missing_shards()) * bytes_per_pair(
        self.settings['pair_format'], shape)
    free = shutil.disk_usage(self.folder).free
    if needed > free:
      raise OSError(f'{len(self.missing_shards())} shards of pairs need {needed / 1e9:.2f} GB but {self.folder} has '
                    f'{free / 1e9:.2f} GB free. Free space, lower reflow.total_number_of_samples, or use '
                    f"reflow.pair_format='compact' ({bytes_per_pair('compact', shape)} instead of "
                    f"{bytes_per_pair('float32', shape)} bytes per pair).")
    return needed

  def labels_path(self, index):
    return os.path.join(self.folder, f'shard_{index:06d}_labels.npy')

  def write_shard(self, index, z0, z1, nfe, labels=None):
    """Writes shard ``index`` (temporary file, fsync, rename), then its record, then the manifest; the labels of a
    class-conditional teacher's pairs go first, so that a shard on disk always has them."""
    if (labels is not None) != bool(self.settings.get('num_classes', 0)):
      raise ValueError(f'Pairs for {self.folder} need labels exactly when the teacher is class-conditional '
                       f'(num_classes={self.settings.get("num_classes", 0)}); got labels={labels is not None}')
    if labels is not None:
      with atomic_files.atomic_open(self.labels_path(index)) as handle:
        np.save(handle, labels.cpu().numpy().astype(np.int64))
    if self.settings['pair_format'] == 'float32':
      array = np.stack([z0.float().cpu().numpy(), z1.float().cpu().numpy()])
    else:
      array = z1.cpu().numpy().astype(np.float16)
    with atomic_files.atomic_open(self.shard_path(index)) as handle:
      np.save(handle, array)
    first, count = self.shard_range(index)
    atomic_files.write_json(self.record_path(index), {'first_pair': first, 'count': count, 'nfe': int(nfe)})
    self.refresh_manifest()


class PairShards(torch.utils.data.Dataset):
  """Every finished shard under ``data_root`` (all seed folders) as one dataset of float32 pairs, each a
  ``Batch(z0, z1, labels=label)`` whose label (an int) is that of a class-conditional teacher's pair, else None.

  ``num_classes``: that of the model to be trained on them (None: not checked); pairs with labels need a
  class-conditional model of at least their number of classes, and a class-conditional model needs labels.
  """

  def __init__(self, data_root, image_shape=None, num_classes=None):
    if not os.path.isdir(data_root):
      raise FileNotFoundError(f'reflow.data_root={data_root!r} does not exist: generate pairs first with '
                              f"--mode reflow --config.reflow.reflow_type=generate_data_from_z0")
    self.entries = []  # (path, seed, first_pair, count, pair_format, noise_scale, labels path or None)
    shape, pair_classes = None, None
    for folder in sorted(os.listdir(data_root)):
      manifest_path = os.path.join(data_root, folder, 'manifest.json')
      if not os.path.isfile(manifest_path):
        continue
      with open(manifest_path, encoding='utf-8') as handle:
        manifest = json.load(handle)
      shape = shape or tuple(manifest['image_shape'])
      if tuple(manifest['image_shape']) != shape:
        raise ValueError(f'{manifest_path} has pairs of shape {manifest["image_shape"]}, others {list(shape)}')
      classes = manifest.get('num_classes', 0)  # Pairs made before class conditioning have none.
      pair_classes = classes if pair_classes is None else pair_classes
      if classes != pair_classes:
        raise ValueError(f'{manifest_path} has pairs of a teacher with num_classes={classes}, others '
                         f'{pair_classes}: keep the pairs of one teacher under one reflow.data_root')
      for index, shard in sorted(manifest['shards'].items(), key=lambda item: int(item[0])):
        path = os.path.join(data_root, folder, f'shard_{int(index):06d}.npy')
        labels = os.path.join(data_root, folder, f'shard_{int(index):06d}_labels.npy') if classes else None
        self.entries.append((path, manifest['seed'], shard['first_pair'], shard['count'], manifest['pair_format'],
                             manifest['init_noise_scale'], labels))
    if not self.entries:
      raise FileNotFoundError(f'No finished pair shards under {data_root!r}: generate pairs first with --mode reflow '
                              f'--config.reflow.reflow_type=generate_data_from_z0 and this reflow.data_root')
    if image_shape is not None and tuple(image_shape) != shape:
      raise ValueError(f'The pairs under {data_root!r} have shape {list(shape)} but the config expects '
                       f'{list(image_shape)}')
    if num_classes is not None and bool(num_classes) != bool(pair_classes):
      raise ValueError(f'The pairs under {data_root!r} come from a teacher with num_classes={pair_classes}, but '
                       f'model.num_classes={num_classes}: a student learns the labels of its teacher, so set '
                       f'--config.model.num_classes={pair_classes}')
    if num_classes and pair_classes > num_classes:
      raise ValueError(f'The pairs under {data_root!r} have {pair_classes} classes but model.num_classes='
                       f'{num_classes}: set --config.model.num_classes={pair_classes}')
    self.shape = shape
    self.num_classes = pair_classes
    self.offsets = np.cumsum([0] + [entry[3] for entry in self.entries]).tolist()
    self._open = {}
    self._labels = {}

  def __len__(self):
    return self.offsets[-1]

  def _array(self, shard):
    if shard not in self._open:
      path = self.entries[shard][0]
      try:
        self._open[shard] = np.load(path, mmap_mode='r', allow_pickle=False)
      except Exception as error:
        raise ValueError(f'Pair shard {path!r} is unreadable ({error}); delete it and rerun pair generation, which '
                         f'makes only the missing shards') from error
    return self._open[shard]

  def _shard_labels(self, shard):
    if shard not in self._labels:
      path = self.entries[shard][6]
      try:
        self._labels[shard] = np.load(path, allow_pickle=False)
      except Exception as error:
        raise ValueError(f'The labels {path!r} of a pair shard are missing or unreadable ({error}); delete the shard '
                         f'{self.entries[shard][0]!r} and rerun pair generation, which makes only the missing '
                         f'shards') from error
    return self._labels[shard]

  def __getitem__(self, index):
    shard = bisect.bisect_right(self.offsets, index) - 1
    path, seed, first_pair, _, pair_format, noise_scale, labels = self.entries[shard]
    offset = index - self.offsets[shard]
    array = self._array(shard)
    if pair_format == 'float32':
      z0, z1 = torch.from_numpy(np.array(array[0, offset])), torch.from_numpy(np.array(array[1, offset]))
    else:
      z1 = torch.from_numpy(np.array(array[offset], dtype=np.float32))
      z0 = flow_math.indexed_noise(seed, first_pair + offset, 1, self.shape, noise_scale)[0]
    return Batch(z0, z1, labels=None if labels is None else int(self._shard_labels(shard)[offset]))
