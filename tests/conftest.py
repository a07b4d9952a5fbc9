import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


@pytest.fixture(autouse=True)
def _deterministic_torch():
  torch.manual_seed(0)
  yield


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
