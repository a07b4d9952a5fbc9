import os
import sys

# One intra-op thread, in this process and (inherited) in every process the tests start; set before torch loads
# OpenMP. The tests' models are tiny: a second thread gains little, and threads that wait for a busy core made
# them up to 45 times slower on 2 shared cores (tests/test_samplers.py: 853 s with 2 threads, 19 s with 1), while
# a 16-core machine would spread batches of 8 over 16 threads. Comparisons are between runs of the same setting.
os.environ['OMP_NUM_THREADS'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

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

  The published weights cannot be fetched in tests; these exercise every shape and code path, not the values.
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
