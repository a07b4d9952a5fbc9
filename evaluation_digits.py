"""Measures for the built-in digits (8x8 sklearn digits shown at 16x16): a small CNN classifier trained here, its
features for a Frechet distance, and the class agreement of conditional samples.

FID's Inception network means little on 16x16 grey digits, and it needs a download; this classifier trains in a few
seconds on the CPU from the digits themselves (9 of every 10; the tenth is held out), with a fixed seed, so every
run and every machine measures with the same network. Inputs are digits in the demo's model space, [-1, 1].
"""
import functools

import numpy as np
import torch
from torch import nn

import evaluation
from datasets.digits import DIGITS_EVAL_EVERY, load_digit_images, load_digit_labels

IMAGE_SIZE = 16
NUM_CLASSES = 10


class DigitClassifier(nn.Module):
  """A small CNN on 16x16 digits in [-1, 1]; ``features`` is its 64-d penultimate layer."""

  def __init__(self):
    super().__init__()
    self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(64 * 4 * 4, 64), nn.ReLU())
    self.head = nn.Linear(64, NUM_CLASSES)

  def features(self, x):
    return self.body(x)

  def forward(self, x):
    return self.head(self.body(x))


def real_digits():
  """(images in [-1, 1] at IMAGE_SIZE, labels, held-out mask): all 1,797 digits."""
  images = load_digit_images(IMAGE_SIZE) * 2 - 1
  labels = torch.as_tensor(load_digit_labels(), dtype=torch.long)
  held_out = torch.arange(len(images)) % DIGITS_EVAL_EVERY == 0
  return images, labels, held_out


def train_classifier(seed=0, epochs=30, batch_size=64, lr=1e-3):
  """Trains the classifier on 9/10 of the digits (CPU, fixed seed; the global RNG is left as it was).

  Returns (model in eval mode, accuracy on the held-out tenth).
  """
  images, labels, held_out = real_digits()
  x, y = images[~held_out], labels[~held_out]
  with torch.random.fork_rng(devices=[]), torch.enable_grad():  # Also when called under torch.no_grad().
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
      for batch in torch.randperm(len(x)).split(batch_size):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
  model.eval()
  for parameter in model.parameters():
    parameter.requires_grad_(False)
  return model, class_accuracy(model, images[held_out], labels[held_out])


@functools.lru_cache(maxsize=None)
def digit_classifier():
  """The shared classifier (trained once per process, about 5 s on one CPU core)."""
  return train_classifier()[0]


def _check_images(images):
  images = torch.as_tensor(images)
  if images.dim() != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f'The digit classifier takes (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) images in [-1, 1], got shape '
                     f'{tuple(images.shape)}; train the digits at data.image_size={IMAGE_SIZE}')
  return images.detach().float().cpu()


def _batched(function, images, batch_size=1024):
  with torch.no_grad():
    return torch.cat([function(chunk) for chunk in images.split(batch_size)])


def predict(classifier, images):
  """The predicted class of each image, (N,) long."""
  return _batched(classifier, _check_images(images)).argmax(1)


def digit_features(classifier, images):
  """(N, 64) float64 numpy features; images are clamped to [-1, 1] first, as a saved picture would be."""
  return _batched(classifier.features, _check_images(images).clamp(-1, 1)).double().numpy()


def frechet_distance_digits(classifier, a, b):
  """The Frechet distance between two sets of digit images in the classifier's feature space."""
  fa, fb = digit_features(classifier, a), digit_features(classifier, b)
  return float(evaluation.frechet_distance(*evaluation.gaussian_statistics(fa), *evaluation.gaussian_statistics(fb)))


def _check_labels(images, labels):
  labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).cpu()
  if labels.shape != (len(images),):
    raise ValueError(f'Expected one label per image ({len(images)}), got labels of shape {tuple(labels.shape)}')
  if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f'Digit labels must lie in [0, {NUM_CLASSES}), got {labels.min().item()}..{labels.max().item()}')
  return labels


def class_accuracy(classifier, images, labels):
  """The fraction of images the classifier assigns to their label."""
  labels = _check_labels(images, labels)
  if not len(labels):
    raise ValueError('class_accuracy needs at least one image')
  return float((predict(classifier, images) == labels).float().mean())


def per_class_accuracy(classifier, images, labels):
  """{class: fraction of that class's images assigned to it} for the classes present in ``labels``."""
  labels = _check_labels(images, labels)
  hits = predict(classifier, images) == labels
  return {int(c): float(hits[labels == c].float().mean()) for c in torch.unique(labels)}
