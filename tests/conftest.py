import math
import os
import sys

# One intra-op thread, in this process and (inherited) in every process the tests start; set before torch loads
# OpenMP. The tests' models are tiny: a second thread gains little, and threads that wait for a busy core made
# them up to 45 times slower on 2 shared cores (tests/test_samplers.py: 853 s with 2 threads, 19 s with 1), while
# a 16-core machine would spread batches of 8 over 16 threads. Comparisons are between runs of the same setting.
os.environ['OMP_NUM_THREADS'] = '1'

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


TINY_RUN_UPDATES = 30  # Of the shared tiny run: 3 preemption intervals (fault_injection.PREEMPTION_INTERVAL = 10).


@pytest.fixture(autouse=True)
def _deterministic_torch():
  torch.manual_seed(0)
  yield


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """The work directory of one uninterrupted ``main.py --mode train --device=cpu`` run of the tiny digits model
  (``fault_injection.tiny_overrides(TINY_RUN_UPDATES)``), trained once per session; its log is ``run.log`` beside it.

  Shared and read-only: it is the run whose files test_train checks, the uninterrupted reference of the kill and
  signal tests, and its snapshot ``checkpoints/checkpoint_1.pth`` is the teacher of the reflow and evaluation tests.
  A test that writes files copies what it needs into its own folder.
  """
  from tests import fault_injection

  root = tmp_path_factory.mktemp('tiny_run')
  workdir = root / 'workdir'
  command = fault_injection.main_command(workdir, 'train', fault_injection.tiny_overrides(TINY_RUN_UPDATES))
  fault_injection.run_to_completion(command, str(root / 'run.log'))
  return workdir


@pytest.fixture(scope='session')
def random_inception_weights(tmp_path_factory):
  """A weights file for torch-fidelity's Inception with random weights: the real network, no download.

  The published weights cannot be fetched in tests; these exercise every shape and code path, not the values. With
  torch's default initialisation the features come out near 1e-7: a test that checks a metric's value takes
  ``he_inception_weights`` instead.
  """
  from torch_fidelity import feature_extractor_inceptionv3 as inception

  original_load = inception.FeatureExtractorInceptionV3.load_state_dict
  original_fetch = inception.load_state_dict_from_url
  try:
    inception.FeatureExtractorInceptionV3.load_state_dict = lambda self, state_dict, *a, **k: None
    inception.load_state_dict_from_url = lambda *a, **k: {}
    torch.manual_seed(0)
    model = inception.FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'])
  finally:
    inception.FeatureExtractorInceptionV3.load_state_dict = original_load
    inception.load_state_dict_from_url = original_fetch
  path = tmp_path_factory.mktemp('inception') / 'random-inception.pth'
  torch.save(model.state_dict(), path)
  return str(path)


@pytest.fixture(scope='session')
def he_inception_weights(random_inception_weights):
  """A weights file beside ``random_inception_weights``: the same network with He-initialised weights.

  torch's default initialisation shrinks the activations at each of the 94 convolutions (each followed by a
  BatchNorm that is the identity in eval mode, and a ReLU): pool_3 and the logits come out near 1e-7, so FID is near
  1e-12 (below pytest.approx's absolute tolerance), IS is 1 to 1e-15 and KID is lost in float64 rounding. He et al.
  (2015)'s N(0, 2 / fan_in) keeps the variance through conv + ReLU: pool_3 of order 0.1; fc weights N(0, 16^2 /
  2048) give logits of a few units, so IS is visibly above 1 and every metric is tested at its face value.
  """
  path = os.path.join(os.path.dirname(random_inception_weights), 'he-initialised-inception.pth')
  state = torch.load(random_inception_weights, weights_only=True)
  generator = torch.Generator().manual_seed(0)
  for key, value in state.items():
    if value.dim() == 4:  # Convolution weights (out, in, kh, kw).
      state[key] = torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / value[0].numel())
    elif key == 'fc.weight':  # (1008, 2048): the unbiased logits.
      state[key] = torch.randn(value.shape, generator=generator) * (16.0 / math.sqrt(value.shape[1]))
  torch.save(state, path)
  return path


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, tiny_run, he_inception_weights):
  """A work directory holding the session's tiny run's snapshot as checkpoint 1, reference statistics, and the
  Inception weights they were made with (He-initialised); one per test module that asks for it."""
  import shutil

  import run_lib
  from tests.helpers import eval_config

  workdir = tmp_path_factory.mktemp('eval_run')
  (workdir / 'checkpoints').mkdir()
  shutil.copy(tiny_run / 'checkpoints' / 'checkpoint_1.pth', workdir / 'checkpoints' / 'checkpoint_1.pth')
  stats = workdir / 'digits_stats.npz'
  run_lib.compute_reference_stats(eval_config(stats, he_inception_weights), str(workdir))
  return workdir, stats, he_inception_weights


@pytest.fixture()
def unchecked_torchvision_cifar10(monkeypatch):
  """torchvision checks each pickle's md5 against the official files; the fake ones differ."""
  from torchvision.datasets import cifar

  monkeypatch.setattr(cifar, 'check_integrity', lambda *args, **kwargs: True)
  monkeypatch.setattr(cifar.CIFAR10, '_check_integrity', lambda self: True)
