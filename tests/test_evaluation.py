"""Metrics against closed forms, reference statistics, bpd on a Gaussian flow, and --mode eval end to end."""
import hashlib
import itertools
import json
import math
import os
import shutil
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from torch import nn

import datasets
import evaluation
import run_lib
from rectified_flow_pytorch import RectifiedFlow, likelihood
from tests.conftest import TINY_RUN_UPDATES
from tests.fault_injection import PREEMPTION_INTERVAL
from tests.helpers import eval_config, tiny_digits_config

# ---------------------------------------------------------------------------------------------------------------
# Metrics.

def scipy_sqrtm_fid(mu1, sigma1, mu2, sigma2):
  """The reference formula with scipy.linalg.sqrtm (TTUR / pytorch-fid)."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1 + sigma2 - 2 * covmean))


def fid_of_features(features1, features2):
  """FID of two feature sets (N, D) in float64, exact also with fewer samples than dimensions.

  With centred features A (n, D) and B (m, D), S1 = A^T A / (n - 1) and S2 = B^T B / (m - 1). XY and YX have the same
  nonzero eigenvalues, so those of S1 S2 (D, D) are those of C C^T with C = A B^T / sqrt((n - 1)(m - 1)) (n, m):
  Tr (S1 S2)^(1/2) is the sum of the singular values of C, free of the square roots of rounding errors that a
  matrix square root of a singular matrix adds. Tr S1 = ||A||_F^2 / (n - 1).
  """
  f1, f2 = np.asarray(features1, dtype=np.float64), np.asarray(features2, dtype=np.float64)
  a, b = f1 - f1.mean(0), f2 - f2.mean(0)
  n, m = len(a), len(b)
  tr_covmean = np.linalg.svd(a @ b.T / math.sqrt((n - 1) * (m - 1)), compute_uv=False).sum()
  diff = f1.mean(0) - f2.mean(0)
  return float(diff @ diff + (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1) - 2 * tr_covmean)


def inception_score_of_logits(logits):
  """exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax of the logits, p(y) = its mean over x; float64."""
  logits = np.asarray(logits, dtype=np.float64)
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)  # (N, classes)
  log_marginal = np.log(np.exp(log_p).mean(0))
  return float(np.exp(np.mean(np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1))))


def cubic_kernel(a, b):
  """The KID kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
  return (a @ b.T / a.shape[1] + 1) ** 3


def unbiased_mmd2(kxx, kyy, kxy):
  """Unbiased MMD^2 of two sets of m from their kernel matrices: mean off-diagonal K_xx + that of K_yy - 2 mean K_xy."""
  m = len(kxx)
  return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
          - 2 * kxy.mean())


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
  # The small-matrix form used on the evaluation's features agrees with the full one.
  x, y = rng.standard_normal((40, 8)), 0.5 + 2 * rng.standard_normal((30, 8))
  assert fid_of_features(x, y) == pytest.approx(scipy_sqrtm_fid(*evaluation.gaussian_statistics(x),
                                                                *evaluation.gaussian_statistics(y)), rel=1e-9)


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
  mmd2 = unbiased_mmd2(cubic_kernel(x, x), cubic_kernel(y, y), cubic_kernel(x, y))
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


@pytest.fixture(scope='module')
def inception_features(he_inception_weights):
  """The evaluation's feature extractor with the He-initialised weights of ``trained_workdir``."""
  return evaluation.InceptionFeatures(he_inception_weights)


def test_inception_features_have_the_published_shapes(inception_features):
  pool, logits = inception_features(torch.rand(3, 1, 16, 16))
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert torch.isfinite(pool).all() and pool.std() > 0


def tf1_bilinear_resize(images, size):
  """TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres) of (B, C, H, W) to (size, size):
  output row i samples input row y = i H / size, (1 - (y - floor y)) row floor y + (y - floor y) row floor y + 1
  (the last row repeated past the edge); the same along columns."""
  def interpolation(n_in):  # (size, n_in)
    y = np.arange(size) * (n_in / size)
    low = np.floor(y).astype(int)
    matrix = np.zeros((size, n_in))
    np.add.at(matrix, (np.arange(size), low), 1 - (y - low))
    np.add.at(matrix, (np.arange(size), np.minimum(low + 1, n_in - 1)), y - low)
    return matrix

  return np.einsum('ih,bchw,jw->bcij', interpolation(images.shape[2]), images, interpolation(images.shape[3]))


class NetworkInput(Exception):
  """Raised by a forward pre-hook with what a layer was about to receive, ending the forward pass there."""


@pytest.mark.parametrize('size', [8, 16])
def test_inception_sees_truncated_8_bit_images_resized_to_299_as_tensorflow_1_did(inception_features, size):
  # [0, 1] images (k + f) / 255 with f in [0.1, 0.9]: truncation gives the level k, rounding k + 1 where f > 0.5.
  rng = np.random.RandomState(size)
  levels = rng.randint(0, 255, (2, 1, size, size))
  images = torch.from_numpy((levels + rng.uniform(0.1, 0.9, levels.shape)) / 255).float()

  def stop(module, args):
    raise NetworkInput(args[0])

  handle = inception_features.model.Conv2d_1a_3x3.register_forward_pre_hook(stop)
  try:
    with pytest.raises(NetworkInput) as seen:
      inception_features(images)
  finally:
    handle.remove()
  network_input = seen.value.args[0].double().numpy()  # (2, 3, 299, 299)
  # The graph's first convolution sees the grey levels on 3 channels, resized to 299x299, as (v - 128) / 128.
  expected = (tf1_bilinear_resize(np.repeat(levels, 3, axis=1).astype(np.float64), 299) - 128) / 128
  assert network_input.shape == expected.shape == (2, 3, 299, 299)
  np.testing.assert_allclose(network_input, expected, rtol=0, atol=1e-5)  # One grey level is 1/128 = 7.8e-3.


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


class GaussianToGaussianVelocity(nn.Module):
  """The exact velocity of X_t = t X1 + (1 - t) X0 with X0 ~ N(0, s0^2 I) and X1 ~ N(m, diag(s^2)) independent.

  Per pixel X_t ~ N(t m, sigma_t^2), sigma_t^2 = t^2 s^2 + (1 - t)^2 s0^2, and (X1 - X0, X_t) are jointly Gaussian
  with covariance t s^2 - (1 - t) s0^2 = sigma_t sigma_t', so v(x, t) = E[X1 - X0 | X_t = x] = m + (sigma_t' /
  sigma_t)(x - t m). Its flow is x_t = t m + (sigma_t / sigma_1)(x_1 - m), sigma_1 = s: it carries N(0, s0^2 I)
  at t = 0 to N(m, diag(s^2)) at t = 1 exactly.
  """

  def __init__(self, mean, std, noise_std):
    super().__init__()
    self.register_buffer('mean', mean)  # (C, H, W)
    self.register_buffer('std', std)  # (C, H, W)
    self.noise_std = noise_std

  def forward(self, x, times):
    t = times.reshape(-1, 1, 1, 1).to(torch.float64)
    s2, n2 = self.std ** 2, self.noise_std ** 2
    rate = (t * s2 - (1 - t) * n2) / (t ** 2 * s2 + (1 - t) ** 2 * n2)  # sigma_t' / sigma_t
    return (self.mean + rate * (x - t * self.mean)).to(x.dtype)


def test_bits_per_dim_of_a_gaussian_flow_on_digits_has_its_closed_form():
  config = tiny_digits_config()
  config.eval.bpd_num_images = 4
  config.eval.batch_size = 2  # Two batches.
  noise_std, eps = 0.8, config.training.time_eps
  grid = torch.linspace(0.0, 1.0, 256, dtype=torch.float64).reshape(1, 16, 16)
  mean, std = 0.3 * torch.cos(6.0 * grid), 0.7 + 0.4 * grid  # Per pixel, (1, 16, 16).
  flow = RectifiedFlow(GaussianToGaussianVelocity(mean, std, noise_std), noise_std=noise_std, time_eps=eps)
  bpd, nfe = evaluation.bits_per_dim(config, flow, torch.device('cpu'))

  # The framework integrates from the data at t = 1 to t = eps and scores x_eps under N(0, s0^2 I), so
  # log p(x1) = sum_pixels log N(x_eps; 0, s0^2) + log(sigma_eps / sigma_1), x_eps = eps m + (sigma_eps / s)(x1 - m).
  # The Rademacher probe's estimate z^T J z of the divergence is exact for this diagonal Jacobian J (z_i^2 = 1).
  images = torch.stack([datasets.get_dataset(config, train=False)[i] for i in range(4)]).double()  # (4, 1, 16, 16)
  x1 = 2.0 * (255.0 * images + 0.5) / 256.0 - 1.0  # Centre of the dequantised (255 x + u) / 256, u ~ U[0, 1).
  sigma_eps = torch.sqrt(eps ** 2 * std ** 2 + (1 - eps) ** 2 * noise_std ** 2)
  x_eps = eps * mean + sigma_eps / std * (x1 - mean)
  log_p = (torch.distributions.Normal(0.0, noise_std).log_prob(x_eps) + torch.log(sigma_eps / std)).flatten(1).sum(1)
  d = images[0].numel()  # 256
  # 8-bit pixels scaled to [-1, 1) have bins 2/256 = 2^-7 wide: the density per bin is 2^-7 times that per unit.
  expected = float((-log_p / (d * math.log(2)) + 7.0).mean())
  # Dequantisation moves each x1 at most 1/256 from the centre; |d log p / d x1| = |x_eps| sigma_eps / (s0^2 s) < 3
  # here, so the per-pixel mean moves by less than 3 / 256 / ln 2 = 0.017 bits (an offset error moves it by >= 1).
  assert float((x_eps.abs() * sigma_eps / (noise_std ** 2 * std)).max()) < 3.0
  assert bpd == pytest.approx(expected, abs=0.02)
  assert nfe >= 8


# ---------------------------------------------------------------------------------------------------------------
# --mode eval end to end.

def test_stats_mode_writes_the_features_of_the_training_images_and_their_moments(trained_workdir,
                                                                                  inception_features):
  _, stats, weights = trained_workdir
  config = eval_config(stats, weights)
  training_split = datasets.get_dataset(config, train=True)
  images = torch.stack([training_split[i] for i in range(config.eval.stats_num_images)])  # (12, 1, 16, 16)
  pool_3 = inception_features(images)[0].double().numpy()  # (12, 2048)
  scale = np.abs(pool_3).max()
  assert pool_3.std() > 0.01 * scale > 0
  with np.load(stats) as data:
    assert set(data.files) == {'pool_3', 'mu', 'sigma'} and data['pool_3'].dtype == np.float32
    np.testing.assert_allclose(data['pool_3'], pool_3, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(data['mu'], pool_3.mean(0), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(data['sigma'], np.cov(pool_3, rowvar=False), rtol=1e-5, atol=1e-6 * scale ** 2)


def read_rounds(folder):
  """The arrays of every round_*.npz in ``folder``, concatenated in round order."""
  parts = []
  for path in sorted(folder.glob('round_*.npz')):
    with np.load(path) as data:
      parts.append({key: data[key] for key in data.files})
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def test_eval_sweep_writes_reports_and_resumes_without_mixing(trained_workdir, tiny_run, inception_features, tmp_path,
                                                              caplog):
  workdir, stats, weights = trained_workdir
  config = eval_config(stats, weights, inception_score_splits=2)
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

  # The metrics, recomputed from the saved features of the samples and the raw features of the stats file.
  samples = read_rounds(eval_dir / 'ckpt_1')
  pool_3, logits = samples['pool_3'].astype(np.float64), samples['logits']  # (10, 2048), (10, 1008)
  with np.load(stats) as data:
    reference = data['pool_3'].astype(np.float64)  # (12, 2048)
  last_image = torch.from_numpy(samples['images'][-1:])  # The saved features are those of the saved images.
  np.testing.assert_allclose(pool_3[-1:], inception_features(last_image)[0].double().numpy(), rtol=1e-5,
                             atol=1e-6 * np.abs(pool_3).max())
  # torch-fidelity sums the square roots of all 2048 eigenvalues of the singular S1 S2: those of its ~2030 zero
  # eigenvalues are square roots of rounding errors, about 1e-7 of the FID here.
  assert report['fid'] == pytest.approx(fid_of_features(pool_3, reference), rel=1e-5, abs=0)
  assert report['inception_score'] == pytest.approx(inception_score_of_logits(logits), rel=1e-9, abs=0)
  halves = [inception_score_of_logits(part) for part in np.split(logits, 2)]  # 2 splits of consecutive samples.
  assert report['inception_score_split_mean'] == pytest.approx(np.mean(halves), rel=1e-9, abs=0)
  assert report['inception_score_split_std'] == pytest.approx(np.std(halves), rel=1e-6, abs=1e-12)
  # KID averages random subsets of 10 of the 12 reference features (the 10 samples are all of them): it lies within
  # the range of the unbiased MMD^2 over all 66 such subsets.
  kxx, kyy, kxy = cubic_kernel(pool_3, pool_3), cubic_kernel(reference, reference), cubic_kernel(pool_3, reference)
  subsets = [list(subset) for subset in itertools.combinations(range(len(reference)), len(pool_3))]
  mmd2 = [unbiased_mmd2(kxx, kyy[np.ix_(subset, subset)], kxy[:, subset]) for subset in subsets]
  slack = 1e-9 * max(np.abs(mmd2))
  assert min(mmd2) - slack <= report['kid'] <= max(mmd2) + slack
  assert report['straightness'] == pytest.approx(float(samples['straightness'].mean()), rel=1e-12)

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

  # A checkpoint replaced by another file (step 20 of the same run): its sha256 differs from the manifest's, so the
  # folder's rounds are refused, not mixed in (README, Evaluation), and left as they were.
  replaced = tmp_path / 'replaced'
  (replaced / 'checkpoints').mkdir(parents=True)
  shutil.copytree(eval_dir / 'ckpt_1', replaced / 'eval' / 'ckpt_1')
  checkpoint = replaced / 'checkpoints' / 'checkpoint_1.pth'
  shutil.copy(tiny_run / 'checkpoints-meta' / f'checkpoint_{TINY_RUN_UPDATES - PREEMPTION_INTERVAL}.pth', checkpoint)
  old_sha256 = hashlib.sha256((workdir / 'checkpoints' / 'checkpoint_1.pth').read_bytes()).hexdigest()
  new_sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
  assert old_sha256 != new_sha256
  saved = {path.name: path.read_bytes() for path in (replaced / 'eval' / 'ckpt_1').iterdir()}
  with pytest.raises(ValueError, match=f"checkpoint_sha256: '{old_sha256}' there, '{new_sha256}' now"):
    run_lib.evaluate(config, str(replaced), 'eval')
  assert {path.name: path.read_bytes() for path in (replaced / 'eval' / 'ckpt_1').iterdir()} == saved
  assert not (replaced / 'eval' / 'report_1.json').exists()

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
