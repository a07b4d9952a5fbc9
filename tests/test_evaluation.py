"""Metrics against closed forms, reference statistics, bpd on a Gaussian flow, and --mode eval end to end."""
import json
import math
import os
import shutil
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluation
import run_lib
from rectified_flow_pytorch import likelihood
from tests.conftest import TINY_RUN_UPDATES
from tests.test_train import tiny_digits_config


# ---------------------------------------------------------------------------------------------------------------
# Metrics.

def scipy_sqrtm_fid(mu1, sigma1, mu2, sigma2):
  """The reference formula with scipy.linalg.sqrtm (TTUR / pytorch-fid)."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def random_spd(rng, d):
  a = rng.standard_normal((d, 2 * d))
  return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_fid_equals_the_scipy_sqrtm_formula():
  rng = np.random.RandomState(0)
  for d in (2, 16, 64):
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = random_spd(rng, d), random_spd(rng, d)
    assert evaluation.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        scipy_sqrtm_fid(mu1, sigma1, mu2, sigma2), abs=1e-6)


def test_fid_of_diagonal_gaussians_has_its_closed_form():
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])
  expected = 9.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2
  assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-9)
  assert evaluation.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


def test_inception_score_closed_forms_and_splits():
  uniform = np.zeros((100, 10))
  assert evaluation.inception_score(uniform)[0] == pytest.approx(1.0)
  confident = np.full((100, 10), -40.0)  # p(y|x) about 1e-17 off the chosen class.
  confident[np.arange(100), np.arange(100) % 5] = 0.0  # Certain of one class each, 5 classes equally often.
  assert evaluation.inception_score(confident)[0] == pytest.approx(5.0, rel=1e-6)
  # 10 splits: each split of 10 consecutive samples covers all 5 classes twice -> 5 each, std 0.
  assert evaluation.inception_score(confident, splits=10) == pytest.approx((5.0, 0.0), abs=1e-6)


def test_kid_is_zero_in_expectation_for_one_distribution_and_positive_for_two():
  rng = np.random.RandomState(0)
  x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
  same, _ = evaluation.kernel_inception_distance(x, y, subsets=50, subset_size=200)
  shifted, _ = evaluation.kernel_inception_distance(x, y + 1.0, subsets=50, subset_size=200)
  assert abs(same) < 0.01 and shifted > 0.1


def test_kid_matches_the_unbiased_polynomial_mmd():
  rng = np.random.RandomState(1)
  x, y = rng.standard_normal((30, 5)), rng.standard_normal((30, 5)) + 0.3
  kernel = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
  m = 30
  mmd2 = ((kernel(x, x).sum() - np.trace(kernel(x, x))) / (m * (m - 1))
          + (kernel(y, y).sum() - np.trace(kernel(y, y))) / (m * (m - 1)) - 2 * kernel(x, y).mean())
  # One subset of the full size is a permutation of the whole sets: the same statistic.
  assert evaluation.kernel_inception_distance(x, y, subsets=1, subset_size=30)[0] == pytest.approx(mmd2, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Reference statistics and Inception weights.

def test_reference_statistics_in_both_published_forms(tmp_path):
  pool = np.random.RandomState(0).standard_normal((50, 4)).astype(np.float32)
  np.savez(tmp_path / 'pool.npz', pool_3=pool)
  mu, sigma = np.zeros(4), np.eye(4)
  np.savez(tmp_path / 'musigma.npz', mu=mu, sigma=sigma)
  from_pool = evaluation.load_reference_statistics(str(tmp_path / 'pool.npz'))
  np.testing.assert_allclose(from_pool['mu'], pool.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(from_pool['sigma'], np.cov(pool.astype(np.float64), rowvar=False), rtol=1e-12)
  from_moments = evaluation.load_reference_statistics(str(tmp_path / 'musigma.npz'))
  assert from_moments['pool_3'] is None and np.array_equal(from_moments['sigma'], sigma)


def test_reference_statistics_errors_name_the_problem(tmp_path):
  np.savez(tmp_path / 'bad.npz', activations=np.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"\['activations'\].*pool_3"):
    evaluation.load_reference_statistics(str(tmp_path / 'bad.npz'))
  with pytest.raises(FileNotFoundError, match='--mode stats'):
    evaluation.load_reference_statistics(str(tmp_path / 'missing.npz'))


def test_inception_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))

  def offline(*args, **kwargs):
    raise urllib.error.URLError('no network')

  monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
  with pytest.raises(ConnectionError, match=evaluation.INCEPTION_WEIGHTS_FILE) as error:
    evaluation.resolve_inception_weights('')
  assert str(tmp_path / 'hub') in str(error.value)
  with pytest.raises(FileNotFoundError, match='eval.inception_weights_path.*does not exist'):
    evaluation.resolve_inception_weights(str(tmp_path / 'nope.pth'))


def test_inception_features_have_the_published_shapes(random_inception_weights):
  features = evaluation.InceptionFeatures(random_inception_weights)
  pool, logits = features(torch.rand(3, 1, 16, 16))
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert torch.isfinite(pool).all() and pool.std() > 0


# ---------------------------------------------------------------------------------------------------------------
# Likelihood.

@pytest.mark.parametrize('divergence', ['exact', 'hutchinson'])
def test_log_likelihood_of_a_gaussian_to_gaussian_flow(divergence):
  # X0 ~ N(0, I) -> X1 ~ N(mu, diag(s^2)): v_i(x, t) = mu_i + k_i(t) (x_i - t mu_i),
  # k_i = (t s_i^2 - (1 - t)) / (t^2 s_i^2 + (1 - t)^2), transports the marginals exactly.
  mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
  s = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)

  def velocity(x, t):
    t = t[:, None]
    k = (t * s ** 2 - (1 - t)) / (t ** 2 * s ** 2 + (1 - t) ** 2)
    return mu + k * (x - t * mu)

  x1 = mu + s * torch.randn(64, 3, dtype=torch.float64)
  log_p, nfe = likelihood.log_likelihood(velocity, x1, divergence=divergence, rtol=1e-8, atol=1e-8)
  expected = torch.distributions.Normal(mu, s).log_prob(x1).sum(1)
  torch.testing.assert_close(log_p, expected, atol=1e-5, rtol=0)
  assert nfe > 10
  bpd = likelihood.bits_per_dim(log_p, 3)
  torch.testing.assert_close(bpd, -expected / (3 * math.log(2)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# --mode eval end to end.

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
  config.eval.stats_num_images = 24
  config.sampling.sample_N = 3
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return config


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory, tiny_run, random_inception_weights):
  """A work directory holding the session's tiny run's snapshot as checkpoint 1, and reference statistics."""
  workdir = tmp_path_factory.mktemp('eval_run')
  (workdir / 'checkpoints').mkdir()
  shutil.copy(tiny_run / 'checkpoints' / 'checkpoint_1.pth', workdir / 'checkpoints' / 'checkpoint_1.pth')
  stats = workdir / 'digits_stats.npz'
  run_lib.compute_reference_stats(eval_config(stats, random_inception_weights), str(workdir))
  return workdir, stats, random_inception_weights


def test_stats_mode_writes_the_published_form(trained_workdir):
  _, stats, _ = trained_workdir
  with np.load(stats) as data:
    assert data['pool_3'].shape == (24, 2048)
    assert {'pool_3', 'mu', 'sigma'} <= set(data.files)


def test_eval_sweep_writes_reports_and_resumes_without_mixing(trained_workdir, caplog):
  workdir, stats, weights = trained_workdir
  config = eval_config(stats, weights)
  run_lib.evaluate(config, str(workdir), 'eval')
  eval_dir = workdir / 'eval'
  report = json.loads((eval_dir / 'report_1.json').read_text())
  for key in ('fid', 'inception_score', 'inception_score_split_mean', 'kid', 'nfe_mean', 'straightness',
              'eval_loss', 'seconds'):
    assert report[key] is not None and math.isfinite(report[key]), key
  assert report['num_samples'] == 10 and report['nfe_mean'] == 3 and report['sampler'] == 'euler'
  assert report['network_calls_mean'] == 3
  assert (eval_dir / 'report.csv').read_text().splitlines()[1].startswith(f'1,{TINY_RUN_UPDATES},10,')
  assert (eval_dir / 'fid.png').is_file() and (eval_dir / 'ckpt_1' / 'sample_grid.png').is_file()
  rounds = sorted(p.name for p in (eval_dir / 'ckpt_1').glob('round_*.npz'))
  assert rounds == ['round_00000.npz', 'round_00001.npz', 'round_00002.npz']

  # An interrupted evaluation: round 1 is lost. Resuming remakes only it, and gives the same metrics.
  kept = {name: os.path.getmtime(eval_dir / 'ckpt_1' / name) for name in ('round_00000.npz', 'round_00002.npz')}
  os.remove(eval_dir / 'ckpt_1' / 'round_00001.npz')
  run_lib.evaluate(config, str(workdir), 'eval')
  resumed = json.loads((eval_dir / 'report_1.json').read_text())
  assert {name: os.path.getmtime(eval_dir / 'ckpt_1' / name) for name in kept} == kept
  assert (eval_dir / 'ckpt_1' / 'round_00001.npz').is_file()
  assert resumed['fid'] == pytest.approx(report['fid'], rel=1e-9)

  # Other sampler settings are refused in the same folder.
  other = eval_config(stats, weights)
  other.sampling.sample_N = 4
  with pytest.raises(ValueError, match='sample_N: 3 there, 4 now'):
    run_lib.evaluate(other, str(workdir), 'eval')

  # A missing checkpoint is waited for briefly, then skipped: no hang.
  missing = eval_config(stats, weights, begin_ckpt=2, end_ckpt=2, checkpoint_wait_seconds=0.2)
  with caplog.at_level('WARNING'):
    run_lib.evaluate(missing, str(workdir), 'eval_missing')
  assert 'checkpoint_2.pth does not exist after waiting 0.2s' in caplog.text
  assert not (workdir / 'eval_missing' / 'report_2.json').exists()


def test_eval_sweep_reports_bits_per_dim(trained_workdir):
  workdir, stats, weights = trained_workdir
  config = eval_config(stats, weights, enable_sampling=False, enable_loss=False, enable_bpd=True, bpd_num_images=4)
  run_lib.evaluate(config, str(workdir), 'eval_bpd')
  report = json.loads((workdir / 'eval_bpd' / 'report_1.json').read_text())
  # An untrained-ish flow on dequantised 8-bit digits: a finite, positive number of bits per pixel.
  assert math.isfinite(report['bpd']) and report['bpd'] > 0
  assert report['bpd_nfe_mean'] >= 8
