"""Configs: ``default_cifar10_configs.get_default_configs`` holds every key with its default; the run configs under
``configs/rectified_flow`` build on it. ``with_defaults`` gives a config written before a key existed that key's
default, once, when the config is read, so that the code reads every key directly."""
import copy
import json

import ml_collections


def with_defaults(config):
  """Adds to ``config`` (in place; also returned) every key of ``get_default_configs()`` that it lacks, with its
  default value: an old config file or ``config.json`` then runs as it did when it was written (each key added
  since defaults to the behaviour from before it existed)."""
  from configs.default_cifar10_configs import get_default_configs

  _fill(config, get_default_configs())
  return config


def _fill(config, defaults):
  with config.unlocked():
    for key, value in defaults.items():
      if key not in config:
        config[key] = copy.deepcopy(value)
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(config[key], ml_collections.ConfigDict):
        _fill(config[key], value)


def read_config_json(path):
  """The resolved config a run wrote to ``workdir/config.json``, with the defaults of keys added since then."""
  with open(path, encoding='utf-8') as handle:
    return with_defaults(ml_collections.ConfigDict(json.load(handle)))
