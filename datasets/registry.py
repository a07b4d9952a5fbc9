"""Name -> dataset builder registry; an unknown name is an error that lists the valid ones."""
_DATASETS = {}


def register_dataset(name):
  """Decorator for ``builder(config, train: bool) -> Dataset`` yielding float (C, H, W) images in [0, 1]."""

  def register(builder):
    if name in _DATASETS:
      raise ValueError(f'A dataset named {name!r} is already registered')
    _DATASETS[name] = builder
    return builder

  return register


def registered_datasets():
  return sorted(_DATASETS)


def get_dataset(config, train=True):
  """The dataset named by ``config.data.dataset``: images as float tensors in [0, 1], (C, H, W)."""
  name = config.data.dataset
  if name not in _DATASETS:
    raise ValueError(f'Unknown data.dataset {name!r}; registered datasets: {registered_datasets()}')
  return _DATASETS[name](config, train)
