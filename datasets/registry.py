"""(backend, name) -> dataset builder registry; an unknown name or backend is an error that lists the valid ones."""
DATA_BACKENDS = ('torchvision', 'tfds')  # data.backend: who reads the files (tfds: datasets/tfds_backend.py).
_DATASETS = {backend: {} for backend in DATA_BACKENDS}


def register_dataset(name, backend='torchvision'):
  """Decorator for ``builder(config, train: bool) -> Dataset`` yielding float (C, H, W) images in [0, 1]."""

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


def get_dataset(config, train=True):
  """The dataset named by ``config.data.dataset``, read by ``config.data.backend``: float (C, H, W) in [0, 1]."""
  name, backend = config.data.dataset, config.data.backend
  if name not in registered_datasets():
    raise ValueError(f'Unknown data.dataset {name!r}; registered datasets: {registered_datasets()}')
  if backend not in DATA_BACKENDS:
    raise ValueError(f'Unknown data.backend {backend!r}; valid backends: {list(DATA_BACKENDS)}')
  if name not in _DATASETS[backend]:
    raise ValueError(f'data.dataset {name!r} has no {backend!r} backend; datasets of that backend: '
                     f'{registered_datasets(backend)}. Use --config.data.backend='
                     f'{[b for b in DATA_BACKENDS if name in _DATASETS[b]][0]} for {name!r}.')
  return _DATASETS[backend][name](config, train)
