"""Files that are either complete or absent: written to a temporary file beside the target, flushed to disk,
then renamed over it. A killed process leaves at most a ``*.tmp-<pid>`` file, never a torn target."""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
  """Yields a handle to write ``path``'s new content; on success it is fsynced and renamed into place."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  text = {} if 'b' in mode else {'encoding': 'utf-8', 'newline': ''}
  try:
    with open(tmp, mode, **text) as handle:
      yield handle
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
    sync_folder(os.path.dirname(os.path.abspath(path)))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def sync_folder(folder):
  """Flushes a folder's entries (the rename) to disk, where the platform allows opening folders."""
  try:
    descriptor = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(descriptor)
  except OSError:
    pass
  finally:
    os.close(descriptor)


def write_json(path, obj):
  with atomic_open(path, 'w') as handle:
    json.dump(obj, handle, indent=2, sort_keys=True)
