"""Sample-quality metrics: Inception features (torch-fidelity), FID, Inception Score, KID, reference statistics,
and the straightness of a flow.

The Inception network is torch-fidelity's ``inception-v3-compat``: the 2015-12-05 TensorFlow graph that the
published FIDs used, with TensorFlow-1-exact bilinear resizing to 299x299, 2048-d pool_3 features and 1008
unbiased logits. Its weights come from ``eval.inception_weights_path`` or are downloaded once into torch's hub
cache; nothing is downloaded at import or in tests.
"""
import csv
import hashlib
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import atomic_files
import datasets
import distributed
import evaluation_tf
import pretrained_weights
import sampling
from datasets import latents
from models import flow_shape, is_latent
from rectified_flow_pytorch import MeanFlow, flow_math, likelihood, solvers

# eval.metrics_backend: torch-fidelity's Inception, TF-GAN's functions on TF-Hub's Inception, the digits' own CNN.
METRICS_BACKENDS = ('torch', 'tfgan', 'digits')

INCEPTION_WEIGHTS_URL = ('https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/'
                         'weights-inception-2015-12-05-6726825d.pth')
INCEPTION_WEIGHTS_FILE = os.path.basename(INCEPTION_WEIGHTS_URL)


# ----------------------------------------------------------------------------------------------------------------
# Inception features.

def resolve_inception_weights(path='', download=True):
  """A local file with the Inception weights: ``path`` if given, else the hub cache, downloading once if allowed."""
  return pretrained_weights.resolve_pretrained_weights(INCEPTION_WEIGHTS_URL, path, 'Inception weights',
                                                       'eval.inception_weights_path', download)


class InceptionFeatures:
  """pool_3 features (B, 2048) and unbiased logits (B, 1008) of [0, 1] images of any size, 1 or 3 channels."""

  def __init__(self, weights_path, device='cpu'):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity unpickles the file fully; a file that loads weights-only holds nothing that could run code.
    pretrained_weights.load_weights_only(weights_path, 'Inception weights', 'eval.inception_weights_path')
    self.model = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                             feature_extractor_weights_path=weights_path).to(device)
    self.device = device

  @staticmethod
  def to_uint8(images):
    """[0, 1] floats -> uint8 by truncation of 255 x, as the published evaluation did."""
    return (images * 255.0).clamp(0, 255).to(torch.uint8)

  @torch.no_grad()
  def __call__(self, images):
    if images.dtype != torch.uint8:
      images = self.to_uint8(images)
    if images.shape[1] == 1:
      images = images.repeat(1, 3, 1, 1)
    pool, logits = self.model(images.to(self.device))
    return pool.float().cpu(), logits.float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# Statistics and metrics.

def gaussian_statistics(features):
  """(mu, sigma) of (N, D) features in float64, sigma unbiased (N - 1), as numpy.cov."""
  features = np.asarray(features, dtype=np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), by torch-fidelity (float64)."""
  from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'Statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs '
                     f'{sigma2.shape}')
  return fid_statistics_to_metric({'mu': mu1, 'sigma': sigma1}, {'mu': mu2, 'sigma': sigma2},
                                  verbose=False)[KEY_METRIC_FID]


def inception_score(logits, splits=1):
  """exp(E_x KL(p(y|x) || p(y))) over ``splits`` consecutive parts, by torch-fidelity: (mean, std).

  ``splits=1`` is how the published code computed IS (one split over all samples); 10 is the common protocol.
  """
  from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

  result = isc_features_to_metric(torch.as_tensor(np.asarray(logits)), splits=splits, shuffle=False)
  return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


def kernel_inception_distance(features1, features2, subsets=100, subset_size=1000, seed=0):
  """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018), averaged over random
  subsets, by torch-fidelity: (mean, std). The subset size is capped by the smaller set."""
  from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

  features1 = torch.as_tensor(np.asarray(features1, dtype=np.float64))
  features2 = torch.as_tensor(np.asarray(features2, dtype=np.float64))
  size = min(subset_size, len(features1), len(features2))
  if size < 2:
    raise ValueError('KID needs at least two samples in each set')
  result = kid_features_to_metric(features1, features2, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                  kid_kernel='poly', kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                  kid_kernel_poly_coef0=1, verbose=False)
  return result[KEY_METRIC_KID_MEAN], result[KEY_METRIC_KID_STD]


def load_reference_statistics(path):
  """{'mu', 'sigma', 'pool_3' (or None)} from a stats file.

  Reads the published form (key ``pool_3``: raw pool_3 activations of the reference set) and the mu/sigma form
  (keys ``mu`` and ``sigma``).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Reference statistics {path!r} do not exist. Compute them with --mode stats (same '
                            f'config), or place the published file (e.g. cifar10_stats.npz) there, or set '
                            f'--config.eval.stats_path.')
  try:
    with np.load(path, allow_pickle=False) as data:  # Arrays only: an object array is refused, never unpickled.
      stats = {key: data[key] for key in data.files}
  except Exception as error:
    raise ValueError(f'Reference statistics {path!r} could not be read as an .npz of numeric arrays '
                     f'({error})') from error
  keys = set(stats)
  if 'mu' in keys and 'sigma' in keys:
    pool = stats['pool_3'] if 'pool_3' in keys else None
    return {'mu': stats['mu'], 'sigma': stats['sigma'], 'pool_3': pool}
  if 'pool_3' in keys:
    mu, sigma = gaussian_statistics(stats['pool_3'])
    return {'mu': mu, 'sigma': sigma, 'pool_3': stats['pool_3']}
  raise ValueError(f'Reference statistics {path!r} have the keys {sorted(keys)}; expected pool_3 (raw Inception '
                   f'pool_3 activations, the published form) or mu and sigma.')


def save_reference_statistics(path, pool_3):
  """Writes raw pool_3 activations (the published form) and their mu/sigma, atomically."""
  mu, sigma = gaussian_statistics(pool_3)
  with atomic_files.atomic_open(path) as handle:
    np.savez(handle, pool_3=np.asarray(pool_3, dtype=np.float32), mu=mu, sigma=sigma)


# ----------------------------------------------------------------------------------------------------------------
# Straightness.

@torch.no_grad()
def straightness(velocity, x0, *, steps=100, eps=0.0):
  """S(Z) along ``steps``-step Euler trajectories from x0 (Liu et al. 2022, Def. 2.3); zero iff straight, (B,)."""
  meter = solvers.StraightnessMeter(x0)
  z1, _ = solvers.euler(velocity, x0, steps=steps, t0=eps, t1=1.0, on_step=meter.on_step)
  return meter.value(z1)


# ----------------------------------------------------------------------------------------------------------------
# Resumable sampling rounds.

class SampleRounds:
  """Rounds of samples in one folder (``round_{r:05d}.npz``), each written atomically, under a manifest.

  The manifest records what determines the samples (checkpoint hash, sampler settings, seed, round size). A folder
  whose manifest differs is refused, so files from other settings are never mixed into one evaluation.
  """

  def __init__(self, folder, manifest):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'manifest.json')
    manifest = json.loads(json.dumps(manifest))  # Normalise tuples etc. to their JSON form.
    if os.path.exists(path):
      with open(path, encoding='utf-8') as handle:
        existing = json.load(handle)
      if existing != manifest:
        changed = sorted(k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k))
        details = ', '.join(f'{k}: {existing.get(k)!r} there, {manifest.get(k)!r} now' for k in changed)
        raise ValueError(f'{folder} holds samples made with other settings ({details}). Use another '
                         f'--eval_folder, or delete {folder} to start over.')
    else:
      atomic_files.write_json(path, manifest)

  def path(self, index):
    return os.path.join(self.folder, f'round_{index:05d}.npz')

  def read(self, index):
    """The arrays of a finished round, or None if it is missing or unreadable (then it is made again)."""
    path = self.path(index)
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
    except Exception:  # A torn file cannot exist (atomic writes), but a damaged disk can.
      return None

  def write(self, index, **arrays):
    with atomic_files.atomic_open(self.path(index)) as handle:
      np.savez(handle, **arrays)


def file_sha256(path, chunk=1 << 22):
  digest = hashlib.sha256()
  with open(path, 'rb') as handle:
    for block in iter(lambda: handle.read(chunk), b''):
      digest.update(block)
  return digest.hexdigest()


def wait_for_file(path, timeout_seconds, poll_seconds=5.0):
  """True once ``path`` exists; False after ``timeout_seconds`` without it (never waits forever)."""
  deadline = time.monotonic() + timeout_seconds
  while not os.path.exists(path):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return False
    time.sleep(min(poll_seconds, remaining))
  return True


def write_sweep_table(eval_dir):
  """report.csv over every report_{N}.json (report_{N}_{k}step.json: sampled in k steps) in ``eval_dir`` and, when
  FIDs (or digit FDs) exist, fid.png (per checkpoint; a line per step count)."""
  reports = []
  for name in os.listdir(eval_dir):
    if name.startswith('report_') and name.endswith('.json'):
      with open(os.path.join(eval_dir, name), encoding='utf-8') as handle:
        reports.append(json.load(handle))
  reports.sort(key=lambda r: (r['checkpoint'], r.get('sample_steps', 0)))
  columns = ['checkpoint', 'step', 'num_samples', 'fid', 'inception_score', 'inception_score_split_mean',
             'inception_score_split_std', 'kid', 'kid_std', 'nfe_mean', 'network_calls_mean', 'straightness',
             'eval_loss', 'bpd', 'sampler', 'seconds', 'sample_steps', 'digit_fd']  # The last two added later.
  with atomic_files.atomic_open(os.path.join(eval_dir, 'report.csv'), 'w') as handle:
    writer = csv.DictWriter(handle, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(reports)
  metric = 'fid' if any(r.get('fid') is not None for r in reports) else 'digit_fd'
  points = [(r['checkpoint'], r[metric], r.get('sample_steps')) for r in reports if r.get(metric) is not None]
  if points:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for steps in sorted({p[2] for p in points}, key=lambda n: n or 0):  # One line per step count.
      line = [p for p in points if p[2] == steps]
      axis.plot([p[0] for p in line], [p[1] for p in line], marker='o',
                label=None if steps is None else f'{steps} step(s)')
    if any(p[2] is not None for p in points):
      axis.legend()
    axis.set_xlabel('checkpoint')
    axis.set_ylabel('FID' if metric == 'fid' else 'digit FD')
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(eval_dir, 'fid.png'), dpi=100)
    plt.close(figure)
  return reports


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of a checkpoint: held-out loss, bits/dim, sampling rounds, class agreement.

def held_out_batches(config, split, limit=0, dataset=None):
  """Batches of a split (or of ``dataset``) in a fixed order, as [0, 1] images (no augmentation)."""
  dataset = datasets.get_dataset(config, train=split == "train") if dataset is None else dataset
  if limit:
    dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
  return torch.utils.data.DataLoader(dataset, batch_size=config.eval.batch_size, shuffle=False,
                                     num_workers=config.data.num_workers, collate_fn=datasets.collate)


@torch.no_grad()
def held_out_loss(config, flow, device):
  """Mean training loss of the current weights over the held-out split (fixed noise and times: uniform on
  [time_eps, 1] for a rectified flow, the training distribution of (t, s) pairs for a MeanFlow; a latent run's
  over the posterior means of the held-out images)."""
  if is_latent(config):
    scaler = latents.latent_draw(config, augment=False)
    dataset = latents.latent_dataset(config, train=False, device=device)
  else:
    scaler, dataset = datasets.get_data_scaler(config), None
  generator = torch.Generator().manual_seed(config.seed)
  total, count = 0.0, 0
  for batch in held_out_batches(config, 'test', dataset=dataset):
    x1, labels = scaler(batch.x1).to(device), batch.labels
    noise = (torch.randn(x1.shape, generator=generator) * flow.noise_std).to(device)
    if isinstance(flow, MeanFlow):  # Its own (t, s) pairs: the loss it trains on.
      times = {key: value.to(device) for key, value in
               flow.sample_training_times(x1.shape[0], generator=generator).items()}
    else:
      times = {'times': flow_math.sample_times(x1.shape[0], 'uniform', eps=flow.time_eps,
                                               generator=generator).to(device)}
    labels = None if labels is None else labels.to(device)
    total += flow.per_sample_loss(x1, noise=noise, **times, labels=labels).sum().item()
    count += x1.shape[0]
  return total / count


def bits_per_dim(config, flow, device):
  """Mean bits/dim of the bpd split under the flow, with uniform dequantisation, and the mean NFE (class-conditional:
  log p(x | its label), without guidance)."""
  scaler = datasets.get_data_scaler(config)
  generator = torch.Generator().manual_seed(config.seed)
  # Model space spans 2^-7 (centred, [-1, 1)) or 2^-8 ([0, 1)) of the 8-bit range per dimension.
  offset = 7.0 if config.data.centered else 8.0
  values, nfes = [], []
  for batch in held_out_batches(config, config.eval.bpd_dataset, config.eval.bpd_num_images):
    x1 = scaler(datasets.augment(batch.x1, random_flip=False, uniform_dequantization=True, generator=generator))
    labels = None if batch.labels is None else batch.labels.to(device)
    log_p, nfe = likelihood.log_likelihood(
        lambda x, t, labels=labels: flow.velocity(x, t, labels=labels), x1.to(device), t_data=1.0,
        t_noise=config.training.time_eps, noise_std=flow.noise_std,
        divergence=config.eval.bpd_divergence, solver='rk45', rtol=config.sampling.ode_tol,
        atol=config.sampling.ode_tol, generator=generator)
    values.append(likelihood.bits_per_dim(log_p.cpu(), x1[0].numel(), offset))
    nfes.append(nfe)
  return float(torch.cat(values).mean()), float(np.mean(nfes))


def sample_checkpoint(config, flow, rounds, inception, device):
  """Makes (or reuses) every round of eval.num_samples samples; returns their arrays concatenated.

  Under torchrun each process makes the rounds r = rank, rank + world, ...; a sample's noise comes from its own
  seed, so the samples do not depend on the number of processes. Rank 0 returns the arrays, the others None.
  """
  e = config.eval
  sample_fn = sampling.get_sampling_fn(config, (e.batch_size, *flow_shape(config)))
  to_images = latents.model_to_images(config, device)
  num_rounds = -(-e.num_samples // e.batch_size)
  parts = {}
  for index in tqdm(distributed.shard_indices(num_rounds), desc='sampling rounds', dynamic_ncols=True,
                    disable=not distributed.is_main_process()):
    part = rounds.read(index)
    if part is None:
      first = index * e.batch_size
      count = min(e.batch_size, e.num_samples - first)
      _, labels, solution, straightness = sampling.sample_indexed(config, flow, sample_fn, first, count, device,
                                                                  straightness=True)
      samples = solution.x
      images = InceptionFeatures.to_uint8(to_images(samples)).cpu()
      pool_3, logits = inception(images) if inception is not None else (np.zeros((count, 0)), np.zeros((count, 0)))
      part = {'images': images.numpy(), 'pool_3': np.asarray(pool_3), 'logits': np.asarray(logits),
              'nfe': np.full(count, solution.contributing_nfe), 'network_calls': np.full(count, solution.nfe),
              'straightness': straightness.cpu().numpy()}
      if labels is not None:
        part['labels'] = labels.numpy()
      rounds.write(index, **part)
    parts[index] = part
  distributed.barrier()
  if not distributed.is_main_process():
    return None
  for index in range(num_rounds):
    if index not in parts:
      parts[index] = rounds.read(index)
      if parts[index] is None:
        raise RuntimeError(f'Sampling round {rounds.path(index)} of another process is missing or unreadable')
  return {key: np.concatenate([parts[i][key] for i in range(num_rounds)])[:e.num_samples] for key in parts[0]}


def class_agreement(config, images, labels):
  """{'class_accuracy', 'class_accuracy_per_class'}: the fraction of samples that a classifier of the dataset
  assigns to the class they were sampled for (the digits: ``evaluation_digits``' CNN); {} for datasets without one.

  ``images`` (N, C, H, W) uint8 samples as saved, ``labels`` (N,).
  """
  import evaluation_digits  # Here: it builds on this module's Frechet distance.

  if config.data.dataset != 'DIGITS' or config.data.image_size != evaluation_digits.IMAGE_SIZE:
    return {}
  classifier = evaluation_digits.digit_classifier()
  model_space = torch.from_numpy(images).float() / 127.5 - 1.0  # The classifier's input: digits in [-1, 1].
  labels = torch.as_tensor(labels)
  per_class = evaluation_digits.per_class_accuracy(classifier, model_space, labels)
  return {'class_accuracy': evaluation_digits.class_accuracy(classifier, model_space, labels),
          'class_accuracy_per_class': {str(c): float(v) for c, v in per_class.items()}}


def metrics_backend(config, device):
  """(reference statistics, Inception network, its name) of ``eval.metrics_backend`` when the sweep computes FID /
  IS / KID (``eval.enable_sampling`` without ``enable_figures_only``), else (None, None, None): 'torch' is
  torch-fidelity's Inception, 'tfgan' TF-GAN's functions on TF-Hub's Inception (torch-fidelity's if TF-Hub's is
  unavailable). Reads the statistics and the weights now, so that a missing file fails before any sampling.
  'digits' needs neither: the digits' Frechet distance uses ``evaluation_digits``' CNN, trained here (no download).
  """
  e = config.eval
  if e.metrics_backend not in METRICS_BACKENDS:
    raise ValueError(f'Unknown eval.metrics_backend {e.metrics_backend!r}; valid: {list(METRICS_BACKENDS)}')
  reference, inception, inception_name = None, None, None
  if e.metrics_backend == 'digits':
    import evaluation_digits  # Here: it builds on this module's Frechet distance.

    if config.data.dataset != 'DIGITS' or config.data.image_size != evaluation_digits.IMAGE_SIZE:
      raise ValueError(f"eval.metrics_backend='digits' measures the built-in digits at {evaluation_digits.IMAGE_SIZE}"
                       f"x{evaluation_digits.IMAGE_SIZE} (data.dataset='DIGITS', data.image_size=16), not "
                       f"{config.data.dataset} at {config.data.image_size}: use 'torch' for other datasets")
    return None, None, None
  if e.enable_sampling and not e.enable_figures_only:
    reference = load_reference_statistics(e.stats_path)
    if e.metrics_backend == 'tfgan':
      evaluation_tf.require_tfgan()
      inception = evaluation_tf.tfhub_inception_or_none()
      inception_name = evaluation_tf.TFHUB_INCEPTION if inception is not None else None
    if inception is None:
      inception = InceptionFeatures(resolve_inception_weights(e.inception_weights_path), device)
      inception_name = INCEPTION_WEIGHTS_FILE
  return reference, inception, inception_name


def sample_quality(config, results, reference):
  """FID, Inception Scores and KID of ``results`` (``sample_checkpoint``'s pool_3 and logits) against the
  ``reference`` statistics, by ``eval.metrics_backend``; for 'digits', ``digit_fd``: the Frechet distance between
  the samples (as saved, 8-bit) and all 1,797 digits in the features of ``evaluation_digits``' classifier."""
  e = config.eval
  if e.metrics_backend == 'digits':
    import evaluation_digits

    real, _, _ = evaluation_digits.real_digits()
    samples = torch.from_numpy(results['images']).float() / 127.5 - 1.0  # As saved, in the classifier's [-1, 1].
    return {'digit_fd': evaluation_digits.frechet_distance_digits(evaluation_digits.digit_classifier(), samples,
                                                                  real)}
  if e.metrics_backend == 'tfgan':
    report = evaluation_tf.tfgan_metrics(results['logits'], results['pool_3'], reference['pool_3'],
                                         (reference['mu'], reference['sigma']))
    report['metrics_backend'] = 'tfgan'
    return report
  report = {}
  mu, sigma = gaussian_statistics(results['pool_3'])
  report['fid'] = frechet_distance(mu, sigma, reference['mu'], reference['sigma'])
  report['inception_score'] = inception_score(results['logits'], splits=1)[0]
  report['inception_score_split_mean'], report['inception_score_split_std'] = inception_score(
      results['logits'], splits=e.inception_score_splits)
  if reference['pool_3'] is not None:
    report['kid'], report['kid_std'] = kernel_inception_distance(
        results['pool_3'], reference['pool_3'], subsets=e.kid_subsets, subset_size=e.kid_subset_size,
        seed=config.seed)
  else:
    report['kid'] = None  # The stats file has mu/sigma only, not the raw features KID needs.
  return report
