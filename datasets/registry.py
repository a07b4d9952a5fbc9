"""(backend, name) -> dataset builder registry; an unknown name or backend is an error that lists the valid ones.

A class-conditional run (``model.num_classes`` > 0, ``wants_labels``) gets (image, label) items instead of images;
``get_dataset`` checks that the dataset has labels and no more classes than the model has.
"""
import torch

DATA_BACKENDS = ('torchvision', 'tfds')  # data.backend: who reads the files (tfds: datasets/tfds_backend.py).
_DATASETS = {backend: {} for backend in DATA_BACKENDS}


def wants_labels(config):
  """Whether the run is class-conditional (``model.num_classes`` > 0), so that its datasets must yield (image,
  label) pairs."""
  return config.model.num_classes > 0


class LabelledImages(torch.utils.data.Dataset):
  """(image, label) pairs: the images of an image dataset, ``labels[i]`` (an int in [0, len(classes))) for image i;
  ``classes[label]`` names the class."""

  def __init__(self, images, labels, classes):
    labels = [int(label) for label in labels]
    if len(labels) != len(images):
      raise ValueError(f'{len(labels)} labels for {len(images)} images: every image needs one label')
    if labels and not 0 <= min(labels) <= max(labels) < len(classes):
      raise ValueError(f'Labels must lie in [0, {len(classes)}) (one per class of {list(classes)}), got '
                       f'{min(labels)}..{max(labels)}')
    self.images, self.labels, self.classes = images, labels, list(classes)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return self.images[index], self.labels[index]


def register_dataset(name, backend='torchvision'):
  """Decorator for ``builder(config, train: bool) -> Dataset`` yielding float (C, H, W) images in [0, 1], or, when
  ``wants_labels(config)``, (image, int label) pairs from a dataset whose ``classes`` lists the class names (a
  builder of a dataset without labels raises a ValueError then)."""

  def register(builder):
    if name in _DATASETS[backend]:
      raise ValueError(f'A dataset named {name!r} is already registered for the {backend!r} backend')
    _DATASETS[backend][name] = builder
    return builder

  return register


def registered_datasets(backend=None):
  """Dataset names of one backend, or of any backend."""
  backends = DATA_BACKENDS if backend is None else (backend,)
  return sorted({name for b in backends for name in _DATASETS[b]})


def check_num_classes(dataset, config):
  """Raises a ValueError unless the labelled ``dataset`` has at most ``model.num_classes`` classes (a label at or
  above num_classes would be the model's null label or outside its embedding table)."""
  name, num_classes = config.data.dataset, config.model.num_classes
  classes = getattr(dataset, 'classes', None)
  if classes is None:
    raise ValueError(f'data.dataset {name!r} ({config.data.backend} backend) yields no class labels, but '
                     f'model.num_classes={num_classes} asks for them. Use --config.model.num_classes=0 for an '
                     f'unconditional run.')
  if len(classes) > num_classes:
    raise ValueError(f'data.dataset {name!r} has {len(classes)} classes ({", ".join(map(str, classes[:5]))}'
                     f'{", ..." if len(classes) > 5 else ""}), more than model.num_classes={num_classes}: its labels '
                     f'{num_classes}..{len(classes) - 1} would lie outside the model\'s classes 0..{num_classes - 1}. '
                     f'Use --config.model.num_classes={len(classes)}.')


def get_dataset(config, train=True):
  """The dataset named by ``config.data.dataset``, read by ``config.data.backend``: float (C, H, W) in [0, 1], or
  (image, label) pairs with labels in [0, model.num_classes) when ``wants_labels(config)``."""
  name, backend = config.data.dataset, config.data.backend
  if name not in registered_datasets():
    raise ValueError(f'Unknown data.dataset {name!r}; registered datasets: {registered_datasets()}')
  if backend not in DATA_BACKENDS:
    raise ValueError(f'Unknown data.backend {backend!r}; valid backends: {list(DATA_BACKENDS)}')
  if name not in _DATASETS[backend]:
    raise ValueError(f'data.dataset {name!r} has no {backend!r} backend; datasets of that backend: '
                     f'{registered_datasets(backend)}. Use --config.data.backend='
                     f'{[b for b in DATA_BACKENDS if name in _DATASETS[b]][0]} for {name!r}.')
  dataset = _DATASETS[backend][name](config, train)
  if wants_labels(config):
    check_num_classes(dataset, config)
  return dataset
