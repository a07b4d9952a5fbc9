"""The tests' own layout: no module under tests/ imports a test module (tests/test_*.py).

Shared builders live in tests/helpers.py and shared fixtures in tests/conftest.py, so that each test module runs,
changes and is deleted on its own.
"""
import ast
import collections
import glob
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT

TESTS_DIR = os.path.join(REPO_ROOT, 'tests')


def names_a_test_module(parts):
  """Whether a dotted module name (split at the dots) is a test module: ``test_x`` or ``tests.test_x`` (or below)."""
  return bool(parts) and (parts[0].startswith('test_') or
                          (parts[0] == 'tests' and len(parts) > 1 and parts[1].startswith('test_')))


def imports_of_test_modules(source, filename='<source>'):
  """(line, source text) of every import of a test module in ``source``, at any depth (also inside functions)."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    if isinstance(node, ast.Import):
      bad = any(names_a_test_module(alias.name.split('.')) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):  # Also relative: ``from .test_x import y``, ``from . import test_x``.
      parts = node.module.split('.') if node.module else []
      bad = names_a_test_module(parts) or (parts in ([], ['tests']) and
                                           any(alias.name.startswith('test_') for alias in node.names))
    else:
      continue
    if bad:
      found.append((node.lineno, ast.get_source_segment(source, node)))
  return found


@pytest.mark.parametrize('source', [
    'from tests.test_train import tiny_digits_config',
    'from tests import fault_injection, test_train',
    'import tests.test_train',
    'import tests.test_train as train',
    'import os, test_train',
    'from test_train import flat_state',
    'from .test_models import fixture_config',
    'from . import test_models',
    'from .tests.test_models import load_fixture',
    pytest.param('def builder():\n  from tests.test_evaluation import eval_config\n  return eval_config',
                 id='inside a function'),
])
def test_the_check_sees_every_form_of_a_test_module_import(source):
  assert len(imports_of_test_modules(source)) == 1


@pytest.mark.parametrize('source', [
    'from tests.helpers import tiny_digits_config',
    'from tests import fault_injection, helpers',
    'from tests.conftest import TINY_RUN_UPDATES',
    'import tests.reference_data',
    'from . import helpers',
    'import testing_tools',
    'from test import support',
])
def test_the_check_accepts_support_modules(source):
  assert imports_of_test_modules(source) == []


def test_no_module_under_tests_imports_a_test_module():
  paths = sorted(glob.glob(os.path.join(TESTS_DIR, '*.py')))
  assert any(os.path.basename(path).startswith('test_') for path in paths)
  offenders = []
  for path in paths:
    with open(path) as handle:
      source = handle.read()
    name = os.path.relpath(path, REPO_ROOT)
    offenders += [f'{name}:{line}: {text}' for line, text in imports_of_test_modules(source, name)]
  assert not offenders, ('test modules import other test modules; move what they share to tests/helpers.py (or a '
                         'fixture in tests/conftest.py):\n' + '\n'.join(offenders))


def test_no_module_name_occurs_twice_in_the_tree():
  """Every Python file has a name of its own (packages' __init__.py aside): a script run from benchmarks/ or
  examples/ imports the framework's modules by their bare names, and a newcomer finds a module by its name."""
  listed = subprocess.run(['git', 'ls-files', '*.py'], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  paths = collections.defaultdict(list)
  for path in listed.stdout.split():
    if os.path.isfile(os.path.join(REPO_ROOT, path)) and os.path.basename(path) != '__init__.py':
      paths[os.path.basename(path)].append(path)
  assert not {name: found for name, found in paths.items() if len(found) > 1}


def test_every_fault_of_the_mutation_check_applies_to_the_current_code():
  """tests/mutation_check.py seeds each fault by replacing text that must occur once in its file, then runs test
  files that must exist: a move or an edit of that code shows here, not only in the 18-minute check."""
  from tests import mutation_check

  for fault in mutation_check.FAULTS:
    with open(os.path.join(REPO_ROOT, fault.file), encoding='utf-8') as handle:
      assert handle.read().count(fault.old) == 1, f'fault {fault.name}: its text is not once in {fault.file}'
    test_files = [arg.split('::')[0] for arg in fault.tests if arg.startswith('tests/')]
    assert test_files and all(os.path.isfile(os.path.join(REPO_ROOT, name)) for name in test_files), fault.name
