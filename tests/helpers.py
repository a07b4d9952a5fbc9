"""Builders shared by several test modules: configs, fixtures' files and state flatteners.

One definition of each, imported from here (``from tests.helpers import ...``): no test module imports another
(tests/test_layout.py checks it). Shared pytest fixtures live in tests/conftest.py.
"""
import json
import os
import pickle

import ml_collections
import torch

import models
from configs import with_defaults
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config
from datasets.cifar10 import CIFAR10_CLASSES
from tests.reference_data import reference_path

# ---------------------------------------------------------------------------------------------------------------
# The tiny digits model: training, resumes and evaluation.

def tiny_digits_config(**training):
  """The digits demo shrunk to a tiny model, on the CPU on every machine: the tests built on it check bit-exact
  resumes and repeats, a CPU guarantee."""
  config = digits_config()
  config.device = 'cpu'
  config.training.precision = 'fp32'  # Not 'auto' (bf16 on some CPUs): the same arithmetic on every machine.
  config.model.nf = 16
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.1  # Exercises the dropout RNG across resumes.
  config.training.batch_size = 8
  config.training.log_freq = 1
  config.training.eval_freq = 2
  config.sampling.use_ode_sampler = 'euler'
  config.sampling.sample_N = 2
  config.sampling.snapshot_batch_size = 4
  config.data.random_flip = True  # Exercises the augmentation RNG across resumes.
  config.optim.warmup = 2
  for key, value in training.items():
    config.training[key] = value
  return config


def flat_state(state):
  tensors = {f'param.{i}': p.detach().clone() for i, p in enumerate(state['model'].parameters())}
  tensors.update({f'ema.{i}': s.clone() for i, s in enumerate(state['ema'].shadow_params)})
  for index, values in state['optimizer'].state_dict()['state'].items():
    tensors.update({f'adam.{index}.{k}': v.clone() for k, v in values.items()})
  return tensors


def eval_config(stats_path, weights, **eval_overrides):
  config = tiny_digits_config(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=2)
  config.eval.stats_path = str(stats_path)
  config.eval.inception_weights_path = weights
  config.eval.enable_sampling = True
  config.eval.enable_loss = True
  config.eval.num_samples = 10
  config.eval.batch_size = 4
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 1
  config.eval.kid_subsets = 5
  config.eval.stats_num_images = 12
  config.sampling.sample_N = 3
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return config


# ---------------------------------------------------------------------------------------------------------------
# The published tiny networks (tests/reference/official_fixtures).

def fixture_config(name):
  with open(reference_path('official_fixtures', f'{name}_config.json')) as handle:
    spec = json.load(handle)
  return with_defaults(ml_collections.ConfigDict({'model': spec['model'], 'data': {  # Read as main.py reads configs.
      'image_size': spec['image_size'], 'num_channels': 3, 'centered': spec['centered']}}))


def load_fixture(name):
  net = models.create_model(fixture_config(name))
  checkpoint = torch.load(reference_path('official_fixtures', f'{name}_official_checkpoint.pth'),
                          map_location='cpu', weights_only=True)
  io = torch.load(reference_path('official_fixtures', f'{name}_io.pt'), map_location='cpu', weights_only=True)
  return net, checkpoint, io


# ---------------------------------------------------------------------------------------------------------------
# Fake dataset files.

def write_python_cifar10(root, splits, names=CIFAR10_CLASSES):
  """torchvision's CIFAR-10 format under root/cifar-10-batches-py: ``splits`` maps each of data_batch_1..5 and
  test_batch to (N, 3, 32, 32) uint8 images and their (N,) labels."""
  folder = os.path.join(root, 'cifar-10-batches-py')
  os.makedirs(folder)
  for name, (images, labels) in splits.items():
    with open(os.path.join(folder, name), 'wb') as handle:
      pickle.dump({'data': images.reshape(len(images), -1), 'labels': [int(label) for label in labels]}, handle)
  with open(os.path.join(folder, 'batches.meta'), 'wb') as handle:
    pickle.dump({'label_names': list(names)}, handle)
