"""Name -> model class registry; an unknown name is an error that lists the valid ones."""
_MODELS = {}


def register_model(cls=None, *, name=None):
  """Class decorator: ``@register_model(name='ncsnpp')`` makes the class buildable by ``model.name``."""

  def register(model_cls):
    key = name or model_cls.__name__
    if key in _MODELS:
      raise ValueError(f'A model named {key!r} is already registered')
    _MODELS[key] = model_cls
    return model_cls

  return register if cls is None else register(cls)


def get_model_class(name):
  if name not in _MODELS:
    raise ValueError(f'Unknown model.name {name!r}; registered models: {sorted(_MODELS)}')
  return _MODELS[name]


def registered_models():
  return sorted(_MODELS)
