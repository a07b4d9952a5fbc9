"""Pretrained weights that are fetched on request only: a local path, else a cache file, else one download."""
import os
import pickle
import urllib.error

import torch


def resolve_pretrained_weights(url, path='', what='weights', option='', download=True):
  """A local file with the weights at ``url``: ``path`` if given, else torch's hub cache (downloading once).

  Offline, the error names the file, where to put it, and the config ``option`` that takes a local path.
  """
  filename = os.path.basename(url)
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{option}={path!r} does not exist. Download {url} to that path, or leave the option '
                              f'empty to use the cache.')
    return path
  target = os.path.join(torch.hub.get_dir(), 'checkpoints', filename)
  if os.path.isfile(target):
    return target
  message = (f'The {what} {filename} are not in the cache. On a machine without internet, download {url} elsewhere '
             f'and place it at {target}, or pass --config.{option}=/path/to/{filename}.')
  if not download:
    raise FileNotFoundError(message)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  try:
    torch.hub.download_url_to_file(url, target, progress=False)
  except (urllib.error.URLError, OSError) as error:
    raise ConnectionError(f'Downloading the {what} failed ({error}). {message}') from error
  return target


def load_weights_only(path, what='weights', option=''):
  """The tensors saved in ``path``, loaded weights-only: a file that holds other objects (opening it would run code
  from it) is refused with an error that names it."""
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:
    try:
      unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # Not even a readable zip or pickle.
      unsafe = []
    if not isinstance(error, pickle.UnpicklingError) or not unsafe:
      raise ValueError(f'The {what} file {path!r}{f" ({option})" if option else ""} could not be read '
                       f'({type(error).__name__}); it is truncated or corrupt: download it again.') from error
    raise ValueError(f'The {what} file {path!r}{f" ({option})" if option else ""} holds objects other than tensors '
                     f'and plain data ({", ".join(unsafe)}); opening it would execute code from it, so it was not '
                     f'opened. Use a file that holds only the weights.') from None
