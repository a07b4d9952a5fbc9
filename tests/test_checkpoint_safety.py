"""Opening a file never runs code from it: checkpoints load weights-only, other inputs are read without pickle."""
import hashlib
import os
import pickle
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

import checkpoints
import evaluation
import pretrained_weights
import run_lib
from datasets import tfds_backend
from tests import fault_injection
from tests.conftest import TINY_RUN_UPDATES
from tests.helpers import flat_state, tiny_digits_config


class CreatesFile:
  """Unpickling this object opens (creates) ``path``: the stand-in for any code a crafted file could run."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return open, (self.path, 'w')


def craft_checkpoint(source, target, marker):
  """``source``'s checkpoint with one more entry whose unpickling creates ``marker``."""
  checkpoint = torch.load(source, map_location='cpu', weights_only=True)
  torch.save({'payload': CreatesFile(marker), **checkpoint}, target)


def file_digests(folder):
  """{relative path: sha256} of every file under ``folder``."""
  digests = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as handle:
        digests[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
  return digests


def run_main(workdir, mode, overrides, log_path):
  command = fault_injection.main_command(workdir, mode, fault_injection.tiny_overrides(TINY_RUN_UPDATES) + overrides)
  result = subprocess.run(command, cwd=fault_injection.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600, env=fault_injection.run_environment())
  with open(log_path, 'w', encoding='utf-8') as log:
    log.write(result.stdout)
  return result


def assert_refused(result, path, marker):
  assert not os.path.exists(marker), 'unpickling the crafted file ran its code'
  assert result.returncode != 0, result.stdout[-3000:]
  errors = [line for line in result.stdout.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, result.stdout[-3000:]
  assert str(path) in errors[0] and 'holds objects other than tensors and plain data' in errors[0]
  assert 'would execute code from it' in errors[0] and 'allow_pickle_checkpoints=True' in errors[0]
  assert 'Traceback' not in result.stdout


@pytest.fixture
def copied_run(tiny_run, tmp_path):
  workdir = tmp_path / 'workdir'
  shutil.copytree(tiny_run, workdir)
  return workdir


def test_a_crafted_newest_preemption_checkpoint_is_refused_and_nothing_is_changed(copied_run, tmp_path):
  marker = tmp_path / 'marker'
  newest = copied_run / 'checkpoints-meta' / f'checkpoint_{TINY_RUN_UPDATES}.pth'
  craft_checkpoint(newest, newest, marker)
  before = file_digests(copied_run)
  result = run_main(copied_run, 'train', [f'--config.training.n_iters={TINY_RUN_UPDATES + 10}'],
                    tmp_path / 'run.log')
  assert_refused(result, newest, marker)
  after = file_digests(copied_run)
  assert {path: after.get(path) for path in before if path != 'stdout.txt'} == {
      path: digest for path, digest in before.items() if path != 'stdout.txt'}  # No file renamed, lost or changed.
  assert set(after) - set(before) <= {'stdout.txt'}  # No checkpoint, sample or metric written.


def test_a_crafted_snapshot_ends_the_eval_sweep_with_the_error(copied_run, tmp_path):
  marker = tmp_path / 'marker'
  snapshot = copied_run / 'checkpoints' / 'checkpoint_1.pth'
  craft_checkpoint(snapshot, snapshot, marker)
  before = file_digests(copied_run)
  result = run_main(copied_run, 'eval', ['--config.eval.enable_loss=True', '--config.eval.begin_ckpt=1',
                                         '--config.eval.end_ckpt=1'], tmp_path / 'eval.log')
  assert_refused(result, snapshot, marker)
  after = file_digests(copied_run)
  assert all(after.get(path) == digest for path, digest in before.items() if path != 'stdout.txt')
  assert set(after) - set(before) <= {'stdout.txt', os.path.join('eval', 'config.json')}  # No report written.


def test_a_crafted_teacher_is_refused_before_any_pair_is_made(tiny_run, tmp_path):
  marker, teacher = tmp_path / 'marker', tmp_path / 'teacher.pth'
  craft_checkpoint(tiny_run / 'checkpoints' / 'checkpoint_1.pth', teacher, marker)
  teacher_digest = file_digests(tmp_path)['teacher.pth']
  workdir, pairs = tmp_path / 'reflow', tmp_path / 'pairs'
  result = run_main(workdir, 'reflow', ['--config.reflow.reflow_type=generate_data_from_z0',
                                        f'--config.reflow.last_flow_ckpt={teacher}',
                                        f'--config.reflow.data_root={pairs}',
                                        '--config.reflow.total_number_of_samples=8',
                                        '--config.reflow.pairs_per_shard=8'], tmp_path / 'reflow.log')
  assert_refused(result, teacher, marker)
  assert file_digests(tmp_path)['teacher.pth'] == teacher_digest
  assert not pairs.exists() and set(file_digests(workdir)) <= {'stdout.txt'}


def test_opening_an_unsafe_file_takes_the_explicit_opt_in_and_warns(tiny_run, tmp_path, caplog):
  marker, crafted = tmp_path / 'marker', tmp_path / 'crafted.pth'
  craft_checkpoint(tiny_run / 'checkpoints' / 'checkpoint_1.pth', crafted, marker)
  with pytest.raises(checkpoints.CheckpointUnsafeError, match='io.open'):
    checkpoints.read_checkpoint(str(crafted))
  assert not marker.exists()
  assert tiny_digits_config().allow_pickle_checkpoints is False  # Off unless asked for.
  with caplog.at_level('WARNING'):
    checkpoint = checkpoints.read_checkpoint(str(crafted), allow_pickle=True)
  assert marker.exists() and checkpoint['step'] == TINY_RUN_UPDATES
  assert 'full unpickling' in caplog.text and str(crafted) in caplog.text


def test_released_checkpoints_and_the_frameworks_own_load_weights_only(tiny_run):
  from tests.reference_data import reference_path
  for name in ('ddpmpp_tiny', 'ncsnpp_tiny'):
    path = reference_path('official_fixtures', f'{name}_official_checkpoint.pth')
    assert set(torch.load(path, map_location='cpu', weights_only=True)) >= {'model', 'ema', 'step', 'optimizer'}
  for path in [tiny_run / 'checkpoints' / 'checkpoint_1.pth', *sorted((tiny_run / 'checkpoints-meta').iterdir())]:
    saved = torch.load(path, map_location='cpu', weights_only=True)  # torch's own allow-list, nothing added.
    rng = saved['rng']
    assert isinstance(rng['numpy']['key'], torch.Tensor) and rng['numpy']['key'].shape == (624,)
    assert isinstance(rng['python'], tuple) and all(isinstance(v, int) for v in rng['python'][1])
    assert isinstance(saved['config'], str)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
  np.random.seed(3)
  np.random.randn()  # Leaves a cached Gaussian: part of the state.
  random.seed(4)
  torch.save(checkpoints.capture_rng_state(), tmp_path / 'rng.pth')
  expected = (np.random.randn(5), np.random.randint(0, 2**31, 5), [random.random() for _ in range(5)],
              torch.rand(5))
  np.random.seed(0), random.seed(0), torch.manual_seed(0)
  checkpoints.restore_rng_state(torch.load(tmp_path / 'rng.pth', weights_only=True))
  actual = (np.random.randn(5), np.random.randint(0, 2**31, 5), [random.random() for _ in range(5)], torch.rand(5))
  assert np.array_equal(expected[0], actual[0]) and np.array_equal(expected[1], actual[1])
  assert expected[2] == actual[2] and torch.equal(expected[3], actual[3])


def write_legacy_checkpoint(path):
  """Rewrites a checkpoint as earlier versions of this framework wrote it: numpy's RNG state as the tuple of
  ``np.random.get_state()``, holding an ndarray."""
  saved = torch.load(path, map_location='cpu', weights_only=True)
  numpy_state = saved['rng']['numpy']
  saved['rng']['numpy'] = (numpy_state['bit_generator'], numpy_state['key'].numpy().astype(np.uint32),
                           numpy_state['pos'], numpy_state['has_gauss'], numpy_state['cached_gaussian'])
  torch.save(saved, path)


def test_a_checkpoint_of_the_earlier_format_resumes_exactly(tmp_path):
  def config(n_iters):
    return tiny_digits_config(n_iters=n_iters, snapshot_freq=100, snapshot_freq_for_preemption=2)

  uninterrupted = run_lib.train(config(4), str(tmp_path / 'a'))
  run_lib.train(config(2), str(tmp_path / 'b'))
  legacy = tmp_path / 'b' / 'checkpoints-meta' / 'checkpoint_2.pth'
  write_legacy_checkpoint(legacy)
  with pytest.raises(pickle.UnpicklingError):  # It holds an ndarray: torch's allow-list alone refuses it.
    torch.load(legacy, map_location='cpu', weights_only=True)
  assert {'numpy._core.multiarray._reconstruct', 'numpy.ndarray'} <= set(
      torch.serialization.get_unsafe_globals_in_checkpoint(str(legacy)))
  resumed = run_lib.train(config(4), str(tmp_path / 'b'))
  assert resumed['step'] == 4 and not legacy.with_suffix('.pth.corrupt').exists()
  expected, actual = flat_state(uninterrupted), flat_state(resumed)
  assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_truncated_files_are_still_corrupt_not_unsafe(tiny_run, tmp_path):
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes((tiny_run / 'checkpoints' / 'checkpoint_1.pth').read_bytes()[:2000])
  with pytest.raises(checkpoints.CheckpointReadError, match='truncated or corrupt'):
    checkpoints.read_checkpoint(str(truncated))


def test_pretrained_weights_files_are_loaded_weights_only(tmp_path):
  marker, crafted = tmp_path / 'marker', tmp_path / 'weights.pth'
  torch.save({'features.0.weight': torch.zeros(1), 'payload': CreatesFile(marker)}, crafted)
  with pytest.raises(ValueError, match='holds objects other than tensors'):
    pretrained_weights.load_weights_only(str(crafted), 'VGG16 weights for LPIPS', 'reflow.lpips_weights_path')
  with pytest.raises(ValueError, match='eval.inception_weights_path'):  # Before torch-fidelity unpickles it.
    evaluation.InceptionFeatures(str(crafted))
  assert not marker.exists()


def test_arrays_from_files_are_read_without_pickle(tmp_path):
  marker = tmp_path / 'marker'
  objects = np.array([CreatesFile(marker), 1], dtype=object)
  np.savez(tmp_path / 'stats.npz', mu=objects, sigma=np.eye(2))
  with pytest.raises(ValueError, match='stats.npz.*could not be read'):
    evaluation.load_reference_statistics(str(tmp_path / 'stats.npz'))
  np.save(tmp_path / 'cache.npy', objects, allow_pickle=True)
  with pytest.raises(ValueError):
    tfds_backend.CachedImages(str(tmp_path / 'cache.npy'))
  assert not marker.exists()


def test_a_truncated_weights_file_is_named_as_corrupt_not_unsafe(tmp_path):
  path = tmp_path / 'weights.pth'
  torch.save({'features.0.weight': torch.zeros(64, 3, 3, 3)}, path)
  path.write_bytes(path.read_bytes()[:500])
  with pytest.raises(ValueError, match='reflow.lpips_weights_path.*truncated or corrupt'):
    pretrained_weights.load_weights_only(str(path), 'VGG16 weights for LPIPS', 'reflow.lpips_weights_path')
