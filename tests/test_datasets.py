"""Dataset registry, class labels, scaling, augmentation and the endless batch iterator."""
import itertools
import os

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from configs import with_defaults
from configs.default_lsun_configs import get_default_configs as folder_defaults
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as cifar10_config
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config
from datasets.cifar10 import CIFAR10_CLASSES
from datasets.digits import DIGITS_EVAL_EVERY, TensorImages, load_digit_images
from datasets.loader import EndlessShuffledSampler
from datasets.registry import LabelledImages, check_num_classes
from tests.helpers import write_python_cifar10


def test_digits_are_real_16x16_images_in_unit_range():
  config = digits_config()
  train, held_out = datasets.get_dataset(config, True), datasets.get_dataset(config, False)
  assert len(train) + len(held_out) == 1797
  images = torch.stack([train[i] for i in range(len(train))])
  assert images.shape[1:] == (1, 16, 16)
  assert images.min() >= 0 and images.max() <= 1
  assert images.mean() > 0.1 and images.std() > 0.2  # Real strokes, not blanks.


def test_unknown_dataset_lists_the_registered_ones():
  config = digits_config()
  config.data.dataset = 'MNIST'
  with pytest.raises(ValueError, match=r"Unknown data.dataset 'MNIST'.*'CIFAR10'.*'DIGITS'.*'LSUN'"):
    datasets.get_dataset(config)


def test_cifar10_missing_offline_says_where_to_put_the_files(tmp_path):
  config = cifar10_config()
  config.data.root = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='cifar-10-batches-py') as error:
    datasets.get_dataset(config)
  assert str(tmp_path) in str(error.value) and 'download=True' in str(error.value)


@pytest.mark.parametrize('centered', [True, False])
def test_scaler_round_trip(centered):
  config = ml_collections.ConfigDict({'data': {'centered': centered}})
  x = torch.rand(4, 3, 8, 8)
  scaled = datasets.get_data_scaler(config)(x)
  if centered:
    assert scaled.min() >= -1 and scaled.min() < -0.9
  torch.testing.assert_close(datasets.get_data_inverse_scaler(config)(scaled), x)


def test_random_flip_mirrors_about_half_of_the_images():
  x = torch.rand(400, 1, 4, 4)
  out = datasets.augment(x, random_flip=True, uniform_dequantization=False,
                         generator=torch.Generator().manual_seed(0))
  same = (out == x).flatten(1).all(1)
  mirrored = (out == x.flip(-1)).flatten(1).all(1)
  assert bool((same | mirrored).all())
  assert 150 < int(mirrored.sum()) < 250


def test_uniform_dequantization_stays_inside_each_8bit_bin():
  levels = torch.randint(0, 256, (8, 3, 4, 4)).float()
  out = datasets.augment(levels / 255.0, random_flip=False, uniform_dequantization=True,
                         generator=torch.Generator().manual_seed(0))
  torch.testing.assert_close(torch.floor(out * 256.0), levels)


def test_endless_sampler_reshuffles_each_epoch_and_resumes_anywhere():
  stream = list(itertools.islice(iter(EndlessShuffledSampler(10, seed=3, global_batch=1)), 30))
  for epoch in range(3):
    assert sorted(stream[10 * epoch:10 * epoch + 10]) == list(range(10))
  assert stream[:10] != stream[10:20]
  resumed = list(itertools.islice(iter(EndlessShuffledSampler(10, seed=3, global_batch=1, start_batch=13)), 17))
  assert resumed == stream[13:]


@pytest.mark.parametrize('world, micro_batch', [(2, 4), (2, 2), (4, 2), (1, 2)])
def test_processes_and_micro_batches_split_each_global_batch_without_changing_it(world, micro_batch):
  """Rows [(j world + r) m, ...) of every global batch of 8 go to micro-batch j of rank r, whatever world and m."""
  single = list(itertools.islice(iter(EndlessShuffledSampler(10, seed=3, global_batch=8)), 8 * 5))
  per_rank = [list(itertools.islice(iter(EndlessShuffledSampler(10, seed=3, global_batch=8, micro_batch=micro_batch,
                                                                 rank=r, world=world, start_batch=1)), 8 // world * 4))
              for r in range(world)]
  micro_steps = 8 // (world * micro_batch)
  for batch in range(4):
    rebuilt = []
    for j in range(micro_steps):
      for r in range(world):
        first = (batch * micro_steps + j) * micro_batch
        rebuilt += per_rank[r][first:first + micro_batch]
    assert rebuilt == single[8 * (batch + 1):8 * (batch + 2)]


def test_batches_resume_and_are_the_same_with_worker_processes():
  dataset = TensorImages(torch.arange(50, dtype=torch.float32).reshape(50, 1, 1, 1))
  single = [b.x1.flatten().tolist() for b in itertools.islice(datasets.endless_batches(dataset, 8, seed=1), 10)]
  workers = [b.x1.flatten().tolist() for b in itertools.islice(
      datasets.endless_batches(dataset, 8, seed=1, num_workers=2), 10)]
  resumed = [b.x1.flatten().tolist() for b in itertools.islice(
      datasets.endless_batches(dataset, 8, seed=1, start_batch=4), 6)]
  assert single == workers
  assert resumed == single[4:]
  assert sorted(sum(single, [])[:50]) == list(range(50))  # The first epoch visits every image once.


# Class labels (model.num_classes > 0).


def all_items(dataset):
  return [dataset[i] for i in range(len(dataset))]


def test_wants_labels_reads_num_classes_and_accepts_configs_without_it():
  def config(**model):
    return with_defaults(ml_collections.ConfigDict({'model': model}))  # As main.py reads it.

  assert not datasets.wants_labels(config())  # Written before class conditioning.
  assert not datasets.wants_labels(config(num_classes=0))
  assert datasets.wants_labels(config(num_classes=10))


def test_digits_labels_are_the_sklearn_targets_of_the_same_split():
  from sklearn.datasets import load_digits

  targets = load_digits().target
  held_out = np.arange(len(targets)) % DIGITS_EVAL_EVERY == 0
  images = load_digit_images(16)
  config = digits_config()
  config.model.num_classes = 10
  for train, rows in ((True, ~held_out), (False, held_out)):
    items = all_items(datasets.get_dataset(config, train))
    assert all(isinstance(label, int) for _, label in items)
    assert [label for _, label in items] == targets[rows].tolist()
    assert torch.equal(torch.stack([image for image, _ in items]), images[torch.from_numpy(rows)])
  assert datasets.get_dataset(config).classes == [str(d) for d in range(10)]


def test_unconditional_digits_are_unchanged_images():
  held_out = torch.arange(1797) % DIGITS_EVAL_EVERY == 0
  dataset = datasets.get_dataset(digits_config(), True)  # model.num_classes = 0
  assert isinstance(dataset, TensorImages) and isinstance(dataset[0], torch.Tensor)
  assert torch.equal(dataset.images, load_digit_images(16)[~held_out])


def test_cifar10_yields_its_own_labels(tmp_path, unchecked_torchvision_cifar10):
  rng = np.random.RandomState(0)
  splits = {name: (rng.randint(0, 256, (3, 3, 32, 32)).astype(np.uint8), rng.randint(0, 10, 3))
            for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']}
  write_python_cifar10(str(tmp_path), splits)
  config = cifar10_config()
  config.data.root = str(tmp_path)
  unconditional = all_items(datasets.get_dataset(config, train=True))
  config.model.num_classes = 10
  for train, names in ((True, [f'data_batch_{i}' for i in range(1, 6)]), (False, ['test_batch'])):
    dataset = datasets.get_dataset(config, train=train)
    images = np.concatenate([splits[name][0] for name in names])
    labels = np.concatenate([splits[name][1] for name in names])
    assert [label for _, label in all_items(dataset)] == labels.tolist()
    assert all(isinstance(label, int) for _, label in all_items(dataset))
    assert torch.equal(torch.stack([image for image, _ in all_items(dataset)]), torch.from_numpy(images) / 255)
    assert list(dataset.classes) == list(CIFAR10_CLASSES)
  assert all(isinstance(image, torch.Tensor) for image in unconditional)
  assert torch.equal(torch.stack(unconditional), torch.from_numpy(np.concatenate(
      [splits[f'data_batch_{i}'][0] for i in range(1, 6)])) / 255)


def write_class_folders(root, layout):
  """``layout`` maps a path relative to ``root`` to a grey level; each becomes an 8x8 PNG of that level."""
  for relative, level in layout.items():
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(path)


def labelled_folder_config(root, num_classes):
  config = folder_defaults()
  config.data.dataset = 'IMAGE_FOLDER'
  config.data.root = str(root)
  config.data.image_size = 8
  config.model.num_classes = num_classes
  return config


# Classes are the top-level sub-folders; images below them at any depth belong to them.
CLASS_LAYOUT = {'dog/b.png': 10, 'cat/z.png': 20, 'cat/kittens/a.png': 30, 'bird/deep/er/c.png': 40,
                'dog/a.png': 50}


def test_image_folder_labels_are_the_class_sub_folders(tmp_path):
  write_class_folders(tmp_path, CLASS_LAYOUT)
  (tmp_path / 'tfds_cache').mkdir()  # Sub-folders without images (a cache, notes) are no class.
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'readme.txt').write_text('not an image')
  dataset = datasets.get_dataset(labelled_folder_config(tmp_path, num_classes=3))
  assert dataset.classes == ['bird', 'cat', 'dog']
  unconditional = datasets.get_dataset(labelled_folder_config(tmp_path, num_classes=0))
  assert isinstance(unconditional[0], torch.Tensor)
  items = all_items(dataset)
  assert torch.equal(torch.stack([image for image, _ in items]), torch.stack(all_items(unconditional)))
  # Same files in the same (sorted path) order as the unconditional run; each image's label is its class folder.
  files = [os.path.relpath(path, tmp_path) for path in unconditional.files]
  assert [label for _, label in items] == [dataset.classes.index(path.split(os.sep)[0]) for path in files]
  assert [round(float(image.mean()) * 255) for image, _ in items] == [CLASS_LAYOUT[path.replace(os.sep, '/')]
                                                                     for path in files]
  assert sorted(label for _, label in items) == [0, 1, 1, 2, 2]
  assert all(isinstance(label, int) for _, label in items)


def test_images_lying_directly_in_the_root_need_class_folders(tmp_path):
  write_class_folders(tmp_path, {'cat/a.png': 0, 'loose1.png': 1, 'loose2.jpg': 2, 'loose3.png': 3,
                                 'loose4.png': 4})
  with pytest.raises(ValueError, match=r'images lying directly in it.*\(4: loose1\.png, loose2\.jpg, loose3\.png, '
                                       r'\.\.\.\).*data\.root/<class name>/.*num_classes=0') as error:
    datasets.get_dataset(labelled_folder_config(tmp_path, num_classes=2))
  assert str(tmp_path) in str(error.value)
  assert len(datasets.get_dataset(labelled_folder_config(tmp_path, num_classes=0))) == 5  # Unconditional: fine.


def test_more_classes_than_the_model_has_is_an_error_with_the_fix(tmp_path):
  config = digits_config()
  config.model.num_classes = 9
  with pytest.raises(ValueError, match=r"'DIGITS' has 10 classes.*model\.num_classes=9.*"
                                       r"--config\.model\.num_classes=10"):
    datasets.get_dataset(config)
  config.model.num_classes = 12  # Fewer classes than the model has are fine.
  assert datasets.get_dataset(config, train=False)[0][1] == 0
  write_class_folders(tmp_path, CLASS_LAYOUT)
  with pytest.raises(ValueError, match=r'has 3 classes \(bird, cat, dog\).*--config\.model\.num_classes=3'):
    datasets.get_dataset(labelled_folder_config(tmp_path, num_classes=2))


def test_a_dataset_without_labels_is_refused_for_a_class_conditional_model():
  config = folder_defaults()  # LSUN; its LMDB does not exist, and is not needed to refuse.
  config.model.num_classes = 10
  with pytest.raises(ValueError, match=r'LSUN has no class labels.*--config\.model\.num_classes=0'):
    datasets.get_dataset(config)
  with pytest.raises(ValueError, match=r'yields no class labels.*--config\.model\.num_classes=0'):
    check_num_classes(TensorImages(torch.zeros(3, 1, 2, 2)), config)


def labelled_levels(count):
  """``count`` (at most 37) 8-bit images whose pixels all equal 7 i / 255, image i labelled (3 i mod 5)."""
  images = (torch.arange(count) * 7 / 255).reshape(count, 1, 1, 1).expand(count, 1, 2, 2).clone()
  return LabelledImages(TensorImages(images), (torch.arange(count) * 3 % 5).tolist(), list('abcde'))


def test_dataset_tensor_returns_the_labels_of_a_labelled_dataset():
  dataset = labelled_levels(37)
  images, labels = datasets.dataset_tensor(dataset, batch_size=10)
  assert images.dtype == torch.uint8 and torch.equal(images.float() / 255, dataset.images.images)
  assert labels.dtype == torch.int64 and labels.device.type == 'cpu'
  assert labels.tolist() == dataset.labels
  digits = datasets.get_dataset(digits_config(), train=False)  # Unconditional: float images, no labels.
  stored, no_labels = datasets.dataset_tensor(digits, batch_size=50)
  assert no_labels is None and torch.equal(stored, digits.images)


@pytest.mark.parametrize('world, micro_batch, start_batch', [(1, None, 0), (1, 2, 3), (2, 3, 5), (2, 1, 11),
                                                             (3, 2, 7)])
def test_resident_labelled_batches_are_the_loaders_batches(world, micro_batch, start_batch):
  """(images, labels) of every rank equal the loader's [images, labels], across epoch boundaries (37 images, global
  batch 6), for any rank, micro-batch and resume point; each label stays with its image."""
  dataset = labelled_levels(37)
  images, labels = datasets.dataset_tensor(dataset)
  for rank in range(world):
    order = dict(seed=3, start_batch=start_batch, micro_batch=micro_batch, rank=rank, world=world)
    loader = datasets.endless_batches(dataset, 6, **order)
    resident = iter(datasets.ResidentBatches(images, 6, labels=labels, **order))
    for _ in range(30):
      (_, loader_images, _, loader_labels), (_, resident_images, _, resident_labels) = next(loader), next(resident)
      assert torch.equal(resident_images, loader_images) and torch.equal(resident_labels, loader_labels)
      assert resident_labels.dtype == torch.int64
      index = (resident_images[:, 0, 0, 0] * 255).round().long() // 7  # Which item each image is.
      assert torch.equal(resident_labels, index * 3 % 5)


def test_level_values_are_the_true_quotients_k_over_255():
  """The table resident 8-bit images are looked up in holds what ToTensor makes of levels 0..255 (its ``.div(255)``
  on the CPU) and numpy's float32 division: correctly rounded k / 255, not k * (1 / 255)."""
  levels = np.arange(256, dtype=np.uint8)
  assert datasets.loader.LEVEL_VALUES.dtype == torch.float32
  assert torch.equal(datasets.loader.LEVEL_VALUES, torch.from_numpy(levels.astype(np.float32) / np.float32(255)))
  assert torch.equal(datasets.loader.LEVEL_VALUES, torch.from_numpy(levels).to(torch.float32).div(255))


def test_resident_batches_check_the_labels_shape():
  with pytest.raises(ValueError, match=r'one label per image, shape \(37,\); got \(36,\)'):
    datasets.ResidentBatches(torch.zeros(37, 1, 2, 2), 6, seed=0, labels=torch.zeros(36, dtype=torch.long))
