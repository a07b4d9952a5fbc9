"""Dataset registry, scaling, augmentation and the endless batch iterator."""
import itertools

import ml_collections
import pytest
import torch

import datasets
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as cifar10_config
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config
from datasets.digits import TensorImages
from datasets.loader import EndlessShuffledSampler


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
  single = [b.flatten().tolist() for b in itertools.islice(datasets.endless_batches(dataset, 8, seed=1), 10)]
  workers = [b.flatten().tolist() for b in itertools.islice(
      datasets.endless_batches(dataset, 8, seed=1, num_workers=2), 10)]
  resumed = [b.flatten().tolist() for b in itertools.islice(
      datasets.endless_batches(dataset, 8, seed=1, start_batch=4), 6)]
  assert single == workers
  assert resumed == single[4:]
  assert sorted(sum(single, [])[:50]) == list(range(50))  # The first epoch visits every image once.
