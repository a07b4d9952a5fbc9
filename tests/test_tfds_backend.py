"""data.backend='tfds' gives the torchvision backend's images, bit for bit, from local files (no network).

Every test that builds a cache starts one TensorFlow child process (about 5-10 s of start-up each); those tests skip
where TensorFlow and tensorflow-datasets are not installed, the others run everywhere.
"""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from configs.default_lsun_configs import get_default_configs as folder_defaults
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as cifar10_config
from datasets import tfds_backend
from datasets.cifar10 import CIFAR10_CLASSES
from tests.helpers import write_python_cifar10

needs_tfds = pytest.mark.skipif(not tfds_backend.tfds_available(),
                                reason='data.backend=tfds needs `pip install -r requirements-tf.txt`')

CIFAR10_TRAIN_BATCHES = 5
CIFAR10_PER_BATCH = 3  # Images per fake data_batch_i (the real one holds 10,000).
CIFAR10_TEST_IMAGES = 4

# Test archives are not the official file, so the test (never the backend) switches off tfds's sha256 check to
# prepare a tfds cifar10 from one: the backend then reads that prepared dataset, as it reads a real one.
PREPARE_UNCHECKED_CIFAR10 = """
import sys
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager
download_manager.DownloadManager._register_or_validate_checksums = lambda self, url, url_info, path: None
config = tfds.download.DownloadConfig(manual_dir=sys.argv[1], try_download_gcs=False)
tfds.builder('cifar10', data_dir=sys.argv[1]).download_and_prepare(download_config=config)
"""


def write_cifar10_archives(root, train, test, labels_train, labels_test):
  """The same (N, 3, 32, 32) uint8 images in both of the official formats: torchvision's python pickles
  (cifar-10-batches-py/) and tfds's binary archive (cifar-10-binary.tar.gz: rows of label byte + 3,072 bytes)."""
  splits = {f'data_batch_{i + 1}': (train[i * CIFAR10_PER_BATCH:(i + 1) * CIFAR10_PER_BATCH],
                                    labels_train[i * CIFAR10_PER_BATCH:(i + 1) * CIFAR10_PER_BATCH])
            for i in range(CIFAR10_TRAIN_BATCHES)}
  splits['test_batch'] = (test, labels_test)
  write_python_cifar10(root, splits)
  binary_files = {'batches.meta.txt': ('\n'.join(CIFAR10_CLASSES) + '\n').encode()}
  for name, (images, labels) in splits.items():
    binary_files[f'{name}.bin'] = np.concatenate([labels[:, None], images.reshape(len(images), -1)], 1).tobytes()
  with tarfile.open(os.path.join(root, 'cifar-10-binary.tar.gz'), 'w:gz') as archive:
    for name, content in binary_files.items():
      member = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
      member.size = len(content)
      archive.addfile(member, io.BytesIO(content))


@pytest.fixture(scope='module')
def fake_cifar10_archives(tmp_path_factory):
  """A tiny CIFAR-10 in both formats (no TensorFlow); returns (root, train, test, train_labels, test_labels), the
  images uint8 (N, 3, 32, 32), the labels uint8 (N,)."""
  root = tmp_path_factory.mktemp('cifar10')
  rng = np.random.RandomState(0)
  train = rng.randint(0, 256, (CIFAR10_TRAIN_BATCHES * CIFAR10_PER_BATCH, 3, 32, 32)).astype(np.uint8)
  test = rng.randint(0, 256, (CIFAR10_TEST_IMAGES, 3, 32, 32)).astype(np.uint8)
  train_labels = rng.randint(0, 10, len(train)).astype(np.uint8)
  test_labels = rng.randint(0, 10, len(test)).astype(np.uint8)
  write_cifar10_archives(str(root), train, test, train_labels, test_labels)
  return str(root), train, test, train_labels, test_labels


@pytest.fixture(scope='module')
def fake_cifar10(fake_cifar10_archives):
  """``fake_cifar10_archives`` with the tfds cifar10 prepared from its binary archive (a TensorFlow child)."""
  root = fake_cifar10_archives[0]
  subprocess.run([sys.executable, '-c', PREPARE_UNCHECKED_CIFAR10, root], check=True, capture_output=True, cwd=root,
                 timeout=300)
  return fake_cifar10_archives


def all_items(dataset):
  return [dataset[i] for i in range(len(dataset))]


def all_images(dataset):
  return torch.stack(all_items(dataset))


@needs_tfds
def test_cifar10_tfds_equals_torchvision_in_images_and_order(fake_cifar10, unchecked_torchvision_cifar10,
                                                              monkeypatch):
  root, train, test = fake_cifar10[:3]
  config = cifar10_config()
  config.data.root = root
  for is_train, expected in ((True, train), (False, test)):
    config.data.backend = 'torchvision'
    torchvision_images = all_images(datasets.get_dataset(config, train=is_train))
    config.data.backend = 'tfds'
    tfds_images = all_images(datasets.get_dataset(config, train=is_train))
    assert tfds_images.shape == (len(expected), 3, 32, 32) and tfds_images.dtype == torch.float32
    assert torch.equal(tfds_images, torchvision_images)  # tfds shuffles on disk; its ids restore the order.
    assert torch.equal(tfds_images, torch.from_numpy(expected).float() / 255)
  # The caches are reused: no second child process.
  monkeypatch.setattr(tfds_backend, 'build_cache', lambda *args, **kwargs: pytest.fail('cache rebuilt'))
  assert torch.equal(all_images(datasets.get_dataset(config, train=False)), tfds_images)
  assert sorted(os.listdir(os.path.join(root, 'tfds_cache')))[0].startswith('cifar10_test_32px_3ch_')


@needs_tfds
def test_cifar10_tfds_labels_equal_torchvision_and_live_beside_the_cache(fake_cifar10, unchecked_torchvision_cifar10,
                                                                       monkeypatch):
  root, _, test, _, test_labels = fake_cifar10
  config = cifar10_config()
  config.data.root = root
  config.model.num_classes = 10
  config.data.backend = 'tfds'
  labelled = datasets.get_dataset(config, train=False)
  items = [labelled[i] for i in range(len(labelled))]
  assert [label for _, label in items] == test_labels.tolist()  # tfds shuffles on disk; its ids restore the order.
  assert all(isinstance(label, int) for _, label in items)
  assert torch.equal(torch.stack([image for image, _ in items]), torch.from_numpy(test).float() / 255)
  assert list(labelled.classes) == list(CIFAR10_CLASSES)
  config.data.backend = 'torchvision'
  torchvision_dataset = datasets.get_dataset(config, train=False)
  assert [torchvision_dataset[i][1] for i in range(len(test))] == test_labels.tolist()
  cache = os.path.join(root, 'tfds_cache')
  (labels_name,) = [name for name in os.listdir(cache) if name.startswith('cifar10_test_') and '.labels' in name]
  assert os.path.isfile(os.path.join(cache, labels_name.replace('.labels', '')))  # Same name and signature.
  # A cache without labels (written before they were exported) still serves unconditional runs as it is ...
  os.remove(os.path.join(cache, labels_name))
  config.data.backend, config.model.num_classes = 'tfds', 0
  with monkeypatch.context() as patch:
    patch.setattr(tfds_backend, 'build_cache', lambda *args, **kwargs: pytest.fail('cache rebuilt'))
    assert torch.equal(all_images(datasets.get_dataset(config, train=False)), torch.from_numpy(test).float() / 255)
  # ... and is rebuilt, with its labels, when a class-conditional run first asks for them.
  config.model.num_classes = 10
  rebuilt = datasets.get_dataset(config, train=False)
  assert [rebuilt[i][1] for i in range(len(rebuilt))] == test_labels.tolist()
  assert os.path.isfile(os.path.join(cache, labels_name))
  config.model.num_classes = 9
  with pytest.raises(ValueError, match=r'has 10 classes.*--config\.model\.num_classes=10'):
    datasets.get_dataset(config, train=False)


def write_folder_images(folder):
  """PNG, JPEG and WebP images whose sizes need a resize and a centre crop to 16x16."""
  rng = np.random.RandomState(1)
  sizes_and_formats = [((40, 24), 'png'), ((24, 40), 'jpg'), ((50, 50), 'webp'), ((33, 47), 'jpeg'),
                       ((16, 16), 'png'), ((64, 20), 'jpg')]
  for i, ((width, height), extension) in enumerate(sizes_and_formats):
    sub = folder / f'part{i % 2}'
    sub.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, height * width * 3).reshape(height, width, 3)
    array = np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8)  # Smooth + noise, like photos.
    Image.fromarray(array).save(sub / f'img{i}.{extension}')


def folder_config(root, backend, num_channels=3):
  config = folder_defaults()
  config.data.dataset = 'CelebA-HQ-Pytorch'
  config.data.root = str(root)
  config.data.image_size = 16
  config.data.num_channels = num_channels
  config.data.backend = backend
  return config


@needs_tfds
def test_image_folder_tfds_equals_torchvision_and_serves_workers(tmp_path):
  write_folder_images(tmp_path)
  torchvision_dataset = datasets.get_dataset(folder_config(tmp_path, 'torchvision'))
  tfds_dataset = datasets.get_dataset(folder_config(tmp_path, 'tfds'))
  # TF decodes (JPEG with the accurate IDCT, as Pillow), then the torchvision backend's own resize + crop runs.
  assert torch.equal(all_images(tfds_dataset), all_images(torchvision_dataset))
  assert all_images(tfds_dataset).shape == (6, 3, 16, 16)
  reference = next(datasets.endless_batches(torchvision_dataset, 4, seed=3)).x1
  assert torch.equal(next(datasets.endless_batches(tfds_dataset, 4, seed=3, num_workers=2)).x1, reference)


@needs_tfds
def test_image_folder_tfds_labels_are_the_class_sub_folders(tmp_path):
  write_folder_images(tmp_path)
  labelled = {}
  for backend in ('tfds', 'torchvision'):  # The torchvision read finds tfds_cache/, which holds no class.
    config = folder_config(tmp_path, backend)
    config.model.num_classes = 2
    labelled[backend] = datasets.get_dataset(config)
    assert labelled[backend].classes == ['part0', 'part1']
  tfds_items, torchvision_items = all_items(labelled['tfds']), all_items(labelled['torchvision'])
  assert [label for _, label in tfds_items] == [label for _, label in torchvision_items] == [0, 0, 0, 1, 1, 1]
  assert torch.equal(torch.stack([image for image, _ in tfds_items]),
                     torch.stack([image for image, _ in torchvision_items]))
  assert torch.equal(torch.stack([image for image, _ in tfds_items]),
                     all_images(datasets.get_dataset(folder_config(tmp_path, 'tfds'))))  # Same cache, unlabelled.
  assert len([name for name in os.listdir(tmp_path / 'tfds_cache') if name.endswith('.npy')]) == 1
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'loose.png')
  config = folder_config(tmp_path, 'tfds')
  config.model.num_classes = 2
  with pytest.raises(ValueError, match=r'images lying directly in it.*\(1: loose\.png\)'):
    datasets.get_dataset(config)


@needs_tfds
def test_image_folder_cache_follows_the_files(tmp_path):
  write_folder_images(tmp_path)
  datasets.get_dataset(folder_config(tmp_path, 'tfds'))
  first_cache = os.listdir(tmp_path / 'tfds_cache')
  path = sorted((tmp_path / 'part0').iterdir())[0]
  Image.fromarray(np.full((30, 20, 3), 200, np.uint8)).save(path)  # Same name, new content.
  tfds_images = all_images(datasets.get_dataset(folder_config(tmp_path, 'tfds')))
  assert torch.equal(tfds_images, all_images(datasets.get_dataset(folder_config(tmp_path, 'torchvision'))))
  second_cache = os.listdir(tmp_path / 'tfds_cache')
  assert len(second_cache) == 1 and second_cache != first_cache  # Rebuilt; the stale cache is gone.


@needs_tfds
def test_image_folder_grayscale_matches(tmp_path):
  write_folder_images(tmp_path)
  tfds_images = all_images(datasets.get_dataset(folder_config(tmp_path, 'tfds', num_channels=1)))
  assert tfds_images.shape == (6, 1, 16, 16)
  assert torch.equal(tfds_images, all_images(datasets.get_dataset(folder_config(tmp_path, 'torchvision', 1))))


@needs_tfds
def test_unreadable_image_is_named(tmp_path):
  write_folder_images(tmp_path)
  (tmp_path / 'part1' / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match=r"cannot read the image .*broken\.png.*Remove or replace"):
    datasets.get_dataset(folder_config(tmp_path, 'tfds'))
  assert not [name for name in os.listdir(tmp_path / 'tfds_cache') if name.endswith('.npy')]


@needs_tfds
def test_missing_sources_say_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    datasets.get_dataset(folder_config(tmp_path / 'missing', 'tfds'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='holds no images'):
    datasets.get_dataset(folder_config(tmp_path / 'empty', 'tfds'))
  config = cifar10_config()
  config.data.root, config.data.backend = str(tmp_path), 'tfds'
  with pytest.raises(FileNotFoundError, match=r'cifar-10-binary\.tar\.gz.*download=True') as error:
    datasets.get_dataset(config)
  assert str(tmp_path) in str(error.value)


@needs_tfds
def test_an_unofficial_cifar10_archive_is_refused(tmp_path):
  rng = np.random.RandomState(2)
  write_cifar10_archives(str(tmp_path), rng.randint(0, 256, (15, 3, 32, 32)).astype(np.uint8),
                         rng.randint(0, 256, (4, 3, 32, 32)).astype(np.uint8), np.zeros(15, np.uint8),
                         np.zeros(4, np.uint8))
  config = cifar10_config()
  config.data.root, config.data.backend = str(tmp_path), 'tfds'
  with pytest.raises(ValueError, match='not the official archive'):
    datasets.get_dataset(config)


def tensorflow_modules():
  return {name for name in sys.modules if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets')}


def test_backend_errors_list_the_valid_choices(tmp_path, monkeypatch):
  loaded_before = tensorflow_modules()  # TensorBoard may have loaded parts of TensorFlow earlier in the session.
  config = folder_config(tmp_path, 'tensorflow')
  with pytest.raises(ValueError, match=r"Unknown data.backend 'tensorflow'.*'torchvision', 'tfds'"):
    datasets.get_dataset(config)
  config = folder_defaults()  # LSUN
  config.data.backend = 'tfds'
  with pytest.raises(ValueError, match=r"'LSUN' has no 'tfds' backend.*'CIFAR10'.*backend=torchvision"):
    datasets.get_dataset(config)
  assert tensorflow_modules() == loaded_before
  monkeypatch.setattr(tfds_backend, 'tfds_available', lambda: False)
  with pytest.raises(ImportError, match=r'pip install -r requirements-tf\.txt'):
    datasets.get_dataset(folder_config(tmp_path, 'tfds'))


def test_torchvision_cifar10_yields_images_not_pairs(fake_cifar10_archives, unchecked_torchvision_cifar10):
  config = cifar10_config()
  config.data.root = fake_cifar10_archives[0]
  batch = next(datasets.endless_batches(datasets.get_dataset(config), 4, seed=0))
  assert batch.labels is None and batch.x1.shape == (4, 3, 32, 32)
