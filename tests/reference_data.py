"""The one way tests find ``../shared/reference`` (published-model fixtures); absent -> a clear skip."""
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Override with RF_REFERENCE_DIR=/path/to/shared/reference.
REFERENCE_DIR = os.environ.get('RF_REFERENCE_DIR', os.path.join(REPO_ROOT, '..', 'shared', 'reference'))


def reference_path(*parts):
  """Absolute path of a reference file; skips the calling test with the reason when it is absent."""
  path = os.path.abspath(os.path.join(REFERENCE_DIR, *parts))
  if not os.path.exists(path):
    pytest.skip(f'reference file {path} is absent: these tests need the shared/ folder beside the checkout '
                f'(or RF_REFERENCE_DIR pointing at shared/reference)')
  return path
