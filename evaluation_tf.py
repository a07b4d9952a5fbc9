"""Optional TF-GAN backend: IS / FID / KID computed by TF-GAN's own functions, as the published evaluation did,
and, where the network reaches TF-Hub, TF-GAN's Inception module for the features.

Install with ``pip install -r requirements-tf.txt``. TensorFlow runs in a child process that never imports
torch: loading TensorFlow into a process that already holds torch crashes (their native libraries clash). Arrays
travel through temporary .npz files. TF-GAN 2.1 (its last release) subclasses ``tf.estimator`` classes at import
time, which TensorFlow 2.16+ no longer ships; the child installs inert placeholders for those names first. The
metric functions used here never touch them.
"""
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np

TFHUB_INCEPTION = 'https://tfhub.dev/tensorflow/tfgan/eval/inception/1'


def tfgan_available():
  return importlib.util.find_spec('tensorflow') is not None and importlib.util.find_spec('tensorflow_gan') is not None


def require_tfgan():
  if not tfgan_available():
    raise ImportError('eval.metrics_backend=tfgan needs TensorFlow and TF-GAN: pip install -r requirements-tf.txt')


def _run_child(command, inputs, timeout=3600):
  """Runs this file as a TensorFlow-only child process on ``inputs`` (arrays); returns its .npz outputs."""
  require_tfgan()
  with tempfile.TemporaryDirectory() as folder:
    source, target = os.path.join(folder, 'in.npz'), os.path.join(folder, 'out.npz')
    np.savez(source, **{k: v for k, v in inputs.items() if v is not None})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    result = subprocess.run([sys.executable, os.path.abspath(__file__), command, source, target], env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
      raise RuntimeError(f'The TF-GAN child process failed ({command}):\n{result.stderr[-3000:]}')
    with np.load(target) as outputs:
      return {key: outputs[key] for key in outputs.files}


def tfgan_metrics(logits, pool_3, reference_pool_3=None, reference_mu_sigma=None):
  """IS (one split, as published), FID and KID from TF-GAN's functions on supplied logits and activations.

  With the reference's raw activations (``reference_pool_3``, the published stats form) FID and KID are TF-GAN's
  ``*_from_activations`` functions; with only its (mu, sigma), FID uses TF-GAN's ``trace_sqrt_product`` on the
  moments and KID is None.
  """
  mu, sigma = reference_mu_sigma if reference_mu_sigma is not None else (None, None)
  out = _run_child('metrics', {'logits': np.asarray(logits, np.float32), 'pool_3': np.asarray(pool_3, np.float32),
                               'reference_pool_3': None if reference_pool_3 is None else
                               np.asarray(reference_pool_3, np.float32), 'mu': mu, 'sigma': sigma})
  return {'inception_score': float(out['inception_score']), 'fid': float(out['fid']),
          'kid': float(out['kid']) if 'kid' in out else None}


class TFHubInception:
  """pool_3 (B, 2048) and logits (B, 1008) from TF-GAN's TF-Hub Inception (the published feature extractor)."""

  def __call__(self, images_uint8):
    out = _run_child('inception', {'images': np.asarray(images_uint8, np.uint8)})
    return out['pool_3'], out['logits']


def tfhub_inception_or_none():
  """The TF-Hub Inception where TF-Hub is reachable, else None (the caller then uses torch-fidelity's port)."""
  try:
    _run_child('probe', {}, timeout=600)
    return TFHubInception()
  except Exception as error:  # Offline, blocked, or a TF-Hub outage: fall back, and say so.
    logging.warning("TF-Hub Inception (%s) is unavailable (%s); using torch-fidelity's port of the same graph for the "
                    'features and TF-GAN for the metrics', TFHUB_INCEPTION, str(error).strip().splitlines()[-1:])
    return None


# ----------------------------------------------------------------------------------------------------------------
# The child process: TensorFlow only.

def _import_tfgan():
  import tensorflow as tf

  class Placeholder(type):
    def __getattr__(cls, name):
      if name.startswith('__'):
        raise AttributeError(name)
      return Placeholder(name, (), {})

  placeholder = Placeholder('estimator', (), {})
  import tensorflow.compat.v1 as tf_v1

  for module in (tf, getattr(tf_v1, '_tfmw_wrapped_module', tf_v1)):
    if 'estimator' not in dir(module):
      setattr(module, 'estimator', placeholder)
  import tensorflow_gan as tfgan
  return tf, tfgan


def _child_metrics(inputs):
  tf, tfgan = _import_tfgan()
  from tensorflow_gan.python.eval import classifier_metrics

  pool = tf.constant(inputs['pool_3'])
  out = {'inception_score': float(tfgan.eval.classifier_score_from_logits(tf.constant(inputs['logits'])))}
  if 'reference_pool_3' in inputs:
    reference = tf.constant(inputs['reference_pool_3'])
    out['fid'] = float(tfgan.eval.frechet_classifier_distance_from_activations(reference, pool))
    out['kid'] = float(tfgan.eval.kernel_classifier_distance_from_activations(reference, pool))
  else:  # ||mu - mu_ref||^2 + Tr(S + S_ref) - 2 Tr((S_ref S)^(1/2)), the last term by TF-GAN.
    pool = tf.cast(pool, tf.float64)
    mean = tf.reduce_mean(pool, axis=0)
    centred = pool - mean
    covariance = tf.matmul(centred, centred, transpose_a=True) / tf.cast(tf.shape(pool)[0] - 1, tf.float64)
    sigma = tf.constant(inputs['sigma'], tf.float64)
    sqrt_trace = classifier_metrics.trace_sqrt_product(sigma, covariance)
    out['fid'] = float(tf.linalg.trace(covariance) + tf.linalg.trace(sigma) - 2.0 * sqrt_trace
                       + tf.reduce_sum(tf.square(mean - tf.constant(inputs['mu'], tf.float64))))
  return out


def _child_inception(inputs):
  tf, tfgan = _import_tfgan()
  import tensorflow_hub as hub

  module = hub.load(TFHUB_INCEPTION)
  images = inputs['images']
  if images.shape[1] == 1:
    images = np.repeat(images, 3, axis=1)
  images = tfgan.eval.preprocess_image(tf.constant(images.transpose(0, 2, 3, 1)))  # 299x299 in [-1, 1].
  outputs = module(images)
  return {'pool_3': np.asarray(outputs['pool_3']).reshape(len(images), -1), 'logits': np.asarray(outputs['logits'])}


def _child_probe(inputs):
  del inputs
  _import_tfgan()
  import tensorflow_hub as hub

  hub.load(TFHUB_INCEPTION)
  return {}


if __name__ == '__main__':
  command, source, target = sys.argv[1:4]
  with np.load(source) as data:
    arrays = {key: data[key] for key in data.files}
  results = {'metrics': _child_metrics, 'inception': _child_inception, 'probe': _child_probe}[command](arrays)
  np.savez(target, **{key: np.asarray(value) for key, value in results.items()})
