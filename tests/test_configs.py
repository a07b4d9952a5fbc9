"""Config files, command-line overrides and main.py's handling of bad input."""
import ast
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from tests.conftest import REPO_ROOT

CIFAR10 = os.path.join(REPO_ROOT, 'configs', 'rectified_flow', 'cifar10_rf_gaussian_ddpmpp.py')
DIGITS = os.path.join(REPO_ROOT, 'configs', 'rectified_flow', 'digits_rf_gaussian_ddpmpp_demo.py')


def parse_config(argv):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_published_cifar10_values():
  config = parse_config(['prog', f'--config={CIFAR10}'])
  assert config.training.batch_size == 128 and config.training.snapshot_freq == 100000
  assert config.model.nf == 128 and tuple(config.model.ch_mult) == (1, 2, 2, 2)
  assert config.model.num_res_blocks == 4 and tuple(config.model.attn_resolutions) == (16,)
  assert config.model.dropout == 0.15 and config.model.ema_rate == 0.999999
  assert config.model.embedding_type == 'positional' and config.model.resblock_type == 'biggan'
  assert config.optim.lr == 2e-4 and config.optim.warmup == 5000 and config.optim.grad_clip == 1.0
  assert config.data.centered and config.training.reduce_mean
  assert config.sampling.use_ode_sampler == 'rk45' and config.sampling.ode_tol == 1e-5


def test_overrides_apply():
  config = parse_config(['prog', f'--config={CIFAR10}', '--config.training.batch_size=8',
                         '--config.sampling.use_ode_sampler=euler', '--config.model.ch_mult=(1,2)'])
  assert config.training.batch_size == 8
  assert config.sampling.use_ode_sampler == 'euler'
  assert tuple(config.model.ch_mult) == (1, 2)


def test_unknown_override_key_is_an_error():
  with pytest.raises(Exception, match='batch_sise'):
    parse_config(['prog', f'--config={CIFAR10}', '--config.training.batch_sise=8'])


def test_override_of_the_wrong_type_is_an_error():
  with pytest.raises(Exception, match='batch_size'):
    parse_config(['prog', f'--config={CIFAR10}', '--config.training.batch_size=eight'])


def config_leaf_keys(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from config_leaf_keys(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def code_attribute_names():
  """Every attribute name read anywhere in the framework's code outside configs/ and tests/."""
  names = set()
  for folder, _, files in os.walk(REPO_ROOT):
    relative = os.path.relpath(folder, REPO_ROOT)
    if relative.split(os.sep)[0] in ('configs', 'tests', 'benchmarks', '.git'):
      continue
    for name in files:
      if name.endswith('.py'):
        with open(os.path.join(folder, name), encoding='utf-8') as handle:
          tree = ast.parse(handle.read())
        names.update(node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute))
  return names


ALL_CONFIGS = sorted(os.path.join(REPO_ROOT, 'configs', 'rectified_flow', name)
                     for name in os.listdir(os.path.join(REPO_ROOT, 'configs', 'rectified_flow'))
                     if name.endswith('.py') and name != '__init__.py' and 'get_config' in
                     open(os.path.join(REPO_ROOT, 'configs', 'rectified_flow', name)).read())


def test_config_file_names_have_no_equals_sign():
  assert ALL_CONFIGS and not [path for path in ALL_CONFIGS if '=' in os.path.basename(path)]


@pytest.mark.parametrize('config_file', ALL_CONFIGS, ids=os.path.basename)
def test_every_config_key_is_read_by_the_code(config_file):
  config = parse_config(['prog', f'--config={config_file}'])
  read = code_attribute_names()
  unread = [key for key in config_leaf_keys(config) if key.split('.')[-1] not in read]
  assert not unread, f'config keys that no code reads: {unread}'


def run_main(*args, cwd=REPO_ROOT):
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'main.py'), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def test_main_rejects_an_unknown_override_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(f'--config={DIGITS}', f'--workdir={workdir}', '--mode=train', '--config.training.n_iter=3')
  assert result.returncode != 0
  assert 'n_iter' in result.stderr
  assert not workdir.exists()


def test_main_rejects_an_unknown_mode_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  result = run_main(f'--config={DIGITS}', f'--workdir={workdir}', '--mode=sample')
  assert result.returncode != 0
  assert 'train' in result.stderr and 'eval' in result.stderr and 'reflow' in result.stderr
  assert not workdir.exists()


def test_main_requires_a_workdir():
  result = run_main(f'--config={DIGITS}', '--mode=train')
  assert result.returncode != 0
  assert 'workdir' in result.stderr


def test_eval_on_a_missing_workdir_is_a_clear_error(tmp_path):
  workdir = tmp_path / 'does_not_exist'
  result = run_main(f'--config={DIGITS}', f'--workdir={workdir}', '--mode=eval')
  assert result.returncode != 0
  assert 'does not exist' in result.stderr
  assert not workdir.exists()
