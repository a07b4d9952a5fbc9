"""Checkpoints in the published format (plus RNG state and config), written atomically and loaded strictly.

A file holds ``{'optimizer', 'model', 'ema', 'step'}`` as the released checkpoints do (``model`` keys carry the
DataParallel ``module.`` prefix, ``ema`` holds ``decay``, ``num_updates`` and ``shadow_params``) and, when written
by this framework, ``rng``, ``config`` and ``nonfinite_steps`` (updates skipped for a non-finite loss) as well.
Preemption checkpoints rotate: ``checkpoints-meta/checkpoint_{step}.pth``, the newest K kept.

Every file is opened weights-only (``torch.load(weights_only=True)``): tensors, numbers, strings and containers,
never an arbitrary object, so opening a file cannot run code from it. What this framework writes is of that kind
(the RNG states as tensors and numbers, the config as JSON text). A file that holds anything else is refused
(``CheckpointUnsafeError``) unless the caller opts in with ``allow_pickle=True`` (``config.allow_pickle_checkpoints``).
"""
import json
import logging
import os
import pickle
import random
import re

import numpy as np
import torch

import atomic_files
from models.velocity import NETWORK_TIME_SCALE, time_scales

MODULE_PREFIX = 'module.'


def checkpoint_dir(workdir):
  return os.path.join(workdir, 'checkpoints')


def preemption_dir(workdir):
  return os.path.join(workdir, 'checkpoints-meta')


def preemption_checkpoint_path(workdir, step=None):
  """``checkpoints-meta/checkpoint_{step}.pth``; without a step, the published single file ``checkpoint.pth``."""
  name = 'checkpoint.pth' if step is None else f'checkpoint_{step}.pth'
  return os.path.join(preemption_dir(workdir), name)


def preemption_checkpoints(workdir):
  """The preemption checkpoints of ``workdir``, newest first: ``checkpoint_{step}.pth`` by decreasing step, then the
  published layout's ``checkpoint.pth`` (a released checkpoint placed there to resume from)."""
  folder = preemption_dir(workdir)
  if not os.path.isdir(folder):
    return []
  numbered = []
  for name in os.listdir(folder):
    match = re.fullmatch(r'checkpoint_(\d+)\.pth', name)
    if match:
      numbered.append((int(match.group(1)), os.path.join(folder, name)))
  paths = [path for _, path in sorted(numbered, reverse=True)]
  legacy = preemption_checkpoint_path(workdir)
  return paths + ([legacy] if os.path.isfile(legacy) else [])


def save_preemption_checkpoint(workdir, state, config, data_generator=None, path_generator=None, keep=3):
  """Writes ``checkpoint_{step}.pth`` atomically, then deletes all but the newest ``keep`` numbered ones."""
  if keep < 1:
    raise ValueError(f'training.keep_preemption_checkpoints={keep}: keep at least one preemption checkpoint')
  path = preemption_checkpoint_path(workdir, state['step'])
  save_checkpoint(path, state, config, data_generator, path_generator)
  for old in [p for p in preemption_checkpoints(workdir) if p != preemption_checkpoint_path(workdir)][keep:]:
    os.remove(old)
  return path


def resume_from_preemption_checkpoint(workdir, state, device='cpu', architecture='', allow_pickle=False,
                                      config=None):
  """Restores ``state`` from the newest readable preemption checkpoint; returns (raw dict, path) or (None, None).

  A truncated or corrupt file is reported, renamed to ``*.corrupt`` (kept for inspection, never read again) and the
  previous one is used. When files exist but none can be read, this is an error, never a silent fresh start. A file
  that holds objects other than tensors and plain data raises ``CheckpointUnsafeError`` and is left where it is.
  """
  candidates = preemption_checkpoints(workdir)
  failures = []
  for path in candidates:
    try:
      return load_checkpoint(path, state, device=device, architecture=architecture, allow_pickle=allow_pickle,
                             config=config), path
    except CheckpointReadError as error:
      corrupt = f'{path}.corrupt'
      os.replace(path, corrupt)
      failures.append(f'{path} ({error.__cause__})')
      logging.warning('%s; renamed it to %s and trying the previous preemption checkpoint', error, corrupt)
  if failures:
    raise CheckpointReadError(f'Every preemption checkpoint under {preemption_dir(workdir)!r} is unreadable: '
                              f'{"; ".join(failures)}. Refusing to start from scratch over them: restore a checkpoint '
                              f'there, or use a new --workdir to start a fresh run.')
  return None, None


def snapshot_checkpoint_path(workdir, index):
  """``checkpoints/checkpoint_{index}.pth`` with index = step // snapshot_freq."""
  return os.path.join(checkpoint_dir(workdir), f'checkpoint_{index}.pth')


def to_published_state_dict(net):
  """The network's state_dict with the ``module.`` prefix of released checkpoints."""
  return {MODULE_PREFIX + key: value for key, value in net.state_dict().items()}


def from_published_state_dict(state_dict):
  """Strips the ``module.`` prefix (DataParallel / DDP) where present."""
  return {key[len(MODULE_PREFIX):] if key.startswith(MODULE_PREFIX) else key: value
          for key, value in state_dict.items()}


def label_hint(state_dict, expected, key='label_embedding.weight'):
  """A sentence on model.num_classes where the file and the model differ in their label embedding."""
  if key not in state_dict and key not in expected:
    return ''
  saved = state_dict[key].shape[0] - 1 if key in state_dict else 0
  configured = expected[key].shape[0] - 1 if key in expected else 0
  if saved == configured:
    return ''
  return (f' The file holds a model with num_classes={saved}, the config has model.num_classes={configured}: set '
          f'--config.model.num_classes={saved}.')


def load_network_weights(net, state_dict, source='checkpoint', architecture=''):
  """Strict load with an error that names the missing and unexpected keys, mismatched shapes and
  ``architecture`` (a description of the configured one)."""
  state_dict = from_published_state_dict(state_dict)
  expected = net.state_dict()
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  mismatched = sorted(f'{k}: {tuple(state_dict[k].shape)} in file, {tuple(expected[k].shape)} in model'
                      for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k].shape)
  if missing or unexpected or mismatched:

    def listing(keys):
      return ', '.join(keys[:10]) + (f' ... ({len(keys)} in all)' if len(keys) > 10 else '') if keys else 'none'

    raise ValueError(f'{source} does not fit the configured {type(net).__name__}: it was saved from a different '
                     f'architecture or config. Missing keys: {listing(missing)}. Unexpected keys: '
                     f'{listing(unexpected)}. Shape mismatches: {listing(mismatched)}. The config expects '
                     f'{architecture or type(net).__name__}. Check --config and its model.* / data.* settings against '
                     f'the run that wrote the file.{label_hint(state_dict, expected)}')
  net.load_state_dict(state_dict, strict=True)


def numpy_rng_state():
  """numpy's global MT19937 state as a tensor and plain numbers (a weights-only load reads it)."""
  name, key, position, has_gauss, cached_gaussian = np.random.get_state()
  return {'bit_generator': name, 'key': torch.from_numpy(key.astype(np.int64)), 'pos': int(position),
          'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)}


def set_numpy_rng_state(state):
  """Inverse of ``numpy_rng_state``; also takes the tuple of ``np.random.get_state()`` that earlier versions of
  this framework stored."""
  if isinstance(state, dict):
    key = state['key'].cpu().numpy().astype(np.uint32)  # (624,) MT19937 key
    state = (state['bit_generator'], key, state['pos'], state['has_gauss'], state['cached_gaussian'])
  np.random.set_state(state)


def capture_rng_state(data_generator=None, path_generator=None):
  """Every RNG stream of the run as tensors and plain Python values: torch's as byte tensors, numpy's as
  ``numpy_rng_state()``, Python's ``random.getstate()`` as the tuple of ints (and None or a float) it is."""
  state = {'torch': torch.get_rng_state(), 'numpy': numpy_rng_state(), 'python': random.getstate()}
  if torch.cuda.is_initialized():  # Only where this process used CUDA (a CPU run on a GPU machine does not).
    state['cuda'] = torch.cuda.get_rng_state_all()
  if data_generator is not None:
    state['data'] = data_generator.get_state()
    state['data_device'] = str(data_generator.device)
  if path_generator is not None:
    state['path'] = path_generator.get_state()
    state['path_device'] = str(path_generator.device)
  return state


def restore_rng_state(state, data_generator=None, path_generator=None):
  torch.set_rng_state(state['torch'])
  set_numpy_rng_state(state['numpy'])
  random.setstate(state['python'])
  if 'cuda' in state and torch.cuda.is_initialized() and len(state['cuda']) == torch.cuda.device_count():
    torch.cuda.set_rng_state_all(state['cuda'])
  if data_generator is not None and 'data' in state:
    if state.get('data_device', 'cpu') == str(data_generator.device):
      data_generator.set_state(state['data'])
    else:
      logging.warning('The checkpoint drew augmentations on %s, this run on %s: their stream restarts from the seed',
                      state.get('data_device', 'cpu'), data_generator.device)
  if path_generator is not None and 'path' in state:
    if state.get('path_device') == str(path_generator.device):
      path_generator.set_state(state['path'])
    else:
      logging.warning('The checkpoint drew training noise on %s, this run on %s: its noise stream cannot be continued '
                      'exactly, so it restarts from the seed', state.get('path_device'), path_generator.device)


def save_checkpoint(path, state, config=None, data_generator=None, path_generator=None):
  """Writes ``state = {'model', 'ema', 'optimizer', 'step'}`` in the published format, plus RNG and config (and
  the fp16 grad scaler's state where one is in use)."""
  scaler = state.get('grad_scaler')
  extra = {'grad_scaler': scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
  optimizer_state = state['optimizer'].state_dict()
  for group in optimizer_state['param_groups']:  # As an eager run writes them (cuda_graphs.GraphedTrainStep).
    scheduled_lr = group.pop('scheduled_lr', None)  # The exact lr of a graph-captured update's float32 device lr.
    if isinstance(group['lr'], torch.Tensor):  # A graph-captured update's device lr, with capture enabled.
      group['lr'] = float(group['lr']) if scheduled_lr is None else scheduled_lr
      group['capturable'] = False
  with atomic_files.atomic_open(path) as handle:
    torch.save({
        **extra,
        'optimizer': optimizer_state,
        'model': to_published_state_dict(state['model']),
        'ema': state['ema'].state_dict(),
        'step': state['step'],
        'nonfinite_steps': state.get('nonfinite_steps', 0),
        'rng': capture_rng_state(data_generator, path_generator),
        'config': config.to_json() if config is not None else None,
    }, handle)


class CheckpointReadError(ValueError):
  """A checkpoint file that cannot be read (truncated or corrupt), as opposed to one of another architecture."""


class CheckpointUnsafeError(ValueError):
  """A checkpoint that holds objects other than tensors and plain data: opening it would run code from the file."""


# What earlier versions of this framework stored besides tensors and plain data: numpy's RNG state, a tuple holding a
# uint32 ndarray (the array, its reconstructor, its dtype and that dtype's class). Allowed only within
# ``read_checkpoint``'s weights-only load, by the names a pickle refers to them by (numpy 2's ``numpy._core``, and
# numpy 1's ``numpy.core`` for files pickled under numpy 1).
_RECONSTRUCT = (getattr(np, '_core', None) or np.core).multiarray._reconstruct
_UINT32_DTYPE_CLASS = type(np.dtype(np.uint32))  # numpy.dtypes.UInt32DType
LEGACY_NUMPY_RNG_GLOBALS = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype,
                            f'{_UINT32_DTYPE_CLASS.__module__}.{_UINT32_DTYPE_CLASS.__qualname__}': _UINT32_DTYPE_CLASS,
                            'numpy._core.multiarray._reconstruct': _RECONSTRUCT,
                            'numpy.core.multiarray._reconstruct': _RECONSTRUCT}


def unsafe_globals(path):
  """The names of the classes and functions that unpickling ``path`` would call beyond what ``read_checkpoint``
  allows (scanned from the pickle opcodes, nothing executed); None where the file cannot even be scanned."""
  try:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  except Exception:  # Not a readable zip or pickle: truncated or corrupt.
    return None
  return [name for name in names if name not in LEGACY_NUMPY_RNG_GLOBALS]


def read_checkpoint(path, device='cpu', allow_pickle=False):
  """The dict saved in ``path``, loaded weights-only (tensors and plain data; opening it runs no code from it).

  Raises ``CheckpointUnsafeError`` for a file that holds other objects, unless ``allow_pickle`` (then it is fully
  unpickled, with a warning), and ``CheckpointReadError`` for a truncated or corrupt one.
  """
  try:
    if allow_pickle:
      logging.warning('Opening %s with full unpickling (config.allow_pickle_checkpoints=True): any code in the file '
                      'runs as you. Do this only for files you trust.', path)
      return torch.load(path, map_location=device, weights_only=False)
    with torch.serialization.safe_globals([(obj, name) for name, obj in LEGACY_NUMPY_RNG_GLOBALS.items()]):
      return torch.load(path, map_location=device, weights_only=True)
  except FileNotFoundError:
    raise
  except Exception as error:
    unsafe = None if allow_pickle or not isinstance(error, pickle.UnpicklingError) else unsafe_globals(path)
    if unsafe:
      raise CheckpointUnsafeError(
          f'Checkpoint {path!r} holds objects other than tensors and plain data ({", ".join(unsafe)}); opening it '
          f'would execute code from it, so it was not opened. If you trust the file and where it came from, pass '
          f'--config.allow_pickle_checkpoints=True to open it fully.') from None
    raise CheckpointReadError(f'Checkpoint {path!r} could not be read ({type(error).__name__}: '
                              f'{str(error).splitlines()[0] if str(error) else ""}); it is truncated or '
                              f'corrupt') from error


def recorded_time_scales(checkpoint):
  """(``model.time_scale``, ``model.interval_scale``) of the run that wrote ``checkpoint`` (the config it
  records); 999 for both where it records none or predates the keys, as every published checkpoint and every run
  before the keys existed fed the network t * 999 (and (s - t) * 999). None where the config cannot be read."""
  text = checkpoint.get('config')
  if text is None:
    return NETWORK_TIME_SCALE, NETWORK_TIME_SCALE
  try:
    model = json.loads(text).get('model', {})
  except (TypeError, ValueError, AttributeError):
    return None
  return (float(model.get('time_scale', NETWORK_TIME_SCALE)), float(model.get('interval_scale', NETWORK_TIME_SCALE)))


def check_time_scales(checkpoint, config, path):
  """Raises a ValueError, saying which overrides fix it, where the network of ``checkpoint`` was trained with its
  time inputs on other scales than ``config`` gives (``model.time_scale``; ``model.interval_scale`` for a network of
  two times): its weights would load but compute another function."""
  recorded = recorded_time_scales(checkpoint)
  if recorded is None:
    return
  expected = time_scales(config)
  keys = ('time_scale', 'interval_scale') if config.model.get('time_inputs', 1) == 2 else ('time_scale',)
  wrong = [(key, have, want) for key, have, want in zip(keys, recorded, expected) if have != want]
  if wrong:
    found = ', '.join(f'model.{key}={have:g}' for key, have, _ in wrong)
    given = ', '.join(f'{want:g}' for _, _, want in wrong)
    fix = ' '.join(f'--config.model.{key}={have:g}' for key, have, _ in wrong)
    raise ValueError(f'{path!r} was trained with {found} (the factors from t and s - t to the network\'s time '
                     f'inputs), this config gives {given}: its network would compute another function. Pass {fix} '
                     f'to use it as trained.')


def load_checkpoint(path, state, device='cpu', load_optimizer=True, architecture='', allow_pickle=False,
                    config=None):
  """Restores ``state`` in place from a published-format file; returns the raw dict read (``read_checkpoint``).

  Given the run's ``config``, a checkpoint trained with the network's time inputs on other scales is refused
  (``check_time_scales``) before anything is restored. RNG state is not touched: call
  ``restore_rng_state(checkpoint['rng'], ...)`` right before the loop resumes.
  """
  checkpoint = read_checkpoint(path, device, allow_pickle=allow_pickle)
  missing = [key for key in ('model', 'ema', 'step') if key not in checkpoint]
  if missing:
    raise ValueError(f'{path!r} is not a rectified-flow checkpoint: it lacks the keys {missing} '
                     f'(expected optimizer, model, ema, step)')
  if config is not None:
    check_time_scales(checkpoint, config, path)
  load_network_weights(state['model'], checkpoint['model'], source=path, architecture=architecture)
  state['ema'].load_state_dict(checkpoint['ema'])
  if load_optimizer:
    state['optimizer'].load_state_dict(checkpoint['optimizer'])
  state['step'] = int(checkpoint['step'])
  state['nonfinite_steps'] = int(checkpoint.get('nonfinite_steps', 0))
  if 'grad_scaler' in checkpoint and state.get('grad_scaler') is not None and state['grad_scaler'].is_enabled():
    state['grad_scaler'].load_state_dict(checkpoint['grad_scaler'])
  return checkpoint
