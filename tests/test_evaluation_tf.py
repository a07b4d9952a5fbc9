"""The optional TF-GAN backend on supplied activations and logits (skipped where TensorFlow is not installed)."""
import numpy as np
import pytest

import evaluation
import evaluation_tf

if not evaluation_tf.tfgan_available():
  pytest.skip('the TF-GAN backend needs `pip install -r requirements-tf.txt`', allow_module_level=True)


@pytest.fixture(scope='module')
def activations():
  rng = np.random.RandomState(0)
  reference = rng.standard_normal((600, 16))
  generated = rng.standard_normal((500, 16)) * 1.2 + 0.3
  logits = rng.standard_normal((500, 10)) * 3
  return reference, generated, logits


def test_tfgan_metrics_agree_with_the_torch_backend(activations):
  reference, generated, logits = activations
  result = evaluation_tf.tfgan_metrics(logits, generated, reference)
  fid = evaluation.frechet_distance(*evaluation.gaussian_statistics(generated),
                                   *evaluation.gaussian_statistics(reference))
  assert result['fid'] == pytest.approx(fid, rel=1e-4)
  assert result['inception_score'] == pytest.approx(evaluation.inception_score(logits)[0], rel=1e-5)
  # TF-GAN's KID averages over blocks of the data, ours over random subsets; both are unbiased estimates.
  kid, kid_std = evaluation.kernel_inception_distance(generated, reference, subsets=200, subset_size=400)
  assert abs(result['kid'] - kid) < 4 * kid_std + 1e-3


def test_tfgan_metrics_closed_forms():
  uniform = np.zeros((100, 10))
  confident = np.full((100, 10), -40.0)
  confident[np.arange(100), np.arange(100) % 4] = 0.0
  assert evaluation_tf.tfgan_metrics(uniform, np.ones((100, 2)), np.ones((100, 2)))['inception_score'] == \
      pytest.approx(1.0, abs=1e-5)
  assert evaluation_tf.tfgan_metrics(confident, np.ones((100, 2)), np.ones((100, 2)))['inception_score'] == \
      pytest.approx(4.0, rel=1e-4)


def test_tfgan_fid_from_reference_moments_equals_the_activation_form(activations):
  reference, generated, logits = activations
  from_activations = evaluation_tf.tfgan_metrics(logits, generated, reference)
  from_moments = evaluation_tf.tfgan_metrics(logits, generated, None, evaluation.gaussian_statistics(reference))
  assert from_moments['fid'] == pytest.approx(from_activations['fid'], rel=1e-4)
  assert from_moments['kid'] is None


def test_eval_sweep_with_the_tfgan_backend(trained_workdir):
  import json

  import run_lib
  from tests.helpers import eval_config

  workdir, stats, weights = trained_workdir
  config = eval_config(stats, weights, metrics_backend='tfgan', enable_loss=False)
  run_lib.evaluate(config, str(workdir), 'eval_tfgan')
  report = json.loads((workdir / 'eval_tfgan' / 'report_1.json').read_text())
  assert report['metrics_backend'] == 'tfgan'
  for key in ('fid', 'inception_score', 'kid'):
    assert np.isfinite(report[key]), key
  torch_report = run_lib.evaluate(eval_config(stats, weights, enable_loss=False), str(workdir), 'eval_torch')[0]
  assert report['fid'] == pytest.approx(torch_report['fid'], rel=1e-3)
  assert report['inception_score'] == pytest.approx(torch_report['inception_score'], rel=1e-4)
