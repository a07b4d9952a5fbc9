"""Runs survive kills, signals, corrupt checkpoints and non-finite losses, and bad input is a clear error."""
import functools
import os
import random
import signal
import subprocess
import time

import pytest
import torch

import checkpoints
import losses
import models
import run_lib
from datasets import Batch, streams
from tests import fault_injection
from tests.conftest import TINY_RUN_UPDATES
from tests.helpers import flat_state, tiny_digits_config

N_ITERS = TINY_RUN_UPDATES  # Preemption checkpoints every fault_injection.PREEMPTION_INTERVAL = 10 updates.


def train_command(workdir):
  """The command of the session's tiny run (``tiny_run``, on the CPU), in ``workdir``."""
  return fault_injection.main_command(workdir, 'train', fault_injection.tiny_overrides(N_ITERS))


@pytest.fixture(scope='module')
def reference_run(tiny_run):
  """An uninterrupted run of ``train_command``: the session's tiny run, made by that same command."""
  return tiny_run


def wait_for(condition, process, log_path, timeout=300):
  deadline = time.monotonic() + timeout
  while not condition():
    if process.poll() is not None:
      with open(log_path, encoding='utf-8') as log:
        output = log.read()[-3000:]
      raise AssertionError(f'the run ended (exit code {process.returncode}) before the test could act:\n{output}')
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.005)


def final_checkpoint(workdir):
  return os.path.join(workdir, 'checkpoints-meta', f'checkpoint_{N_ITERS}.pth')


# ---------------------------------------------------------------------------------------------------------------
# Preemption checkpoints: rotation and fallback.

def test_the_newest_k_preemption_checkpoints_are_kept(tmp_path):
  config = tiny_digits_config(n_iters=5, snapshot_freq=100, snapshot_freq_for_preemption=1)
  config.training.keep_preemption_checkpoints = 2
  run_lib.train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints-meta')) == ['checkpoint_4.pth', 'checkpoint_5.pth']
  config.training.keep_preemption_checkpoints = 0
  with pytest.raises(ValueError, match='keep at least one'):
    run_lib.train(config, str(tmp_path / 'zero'))


def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
  uninterrupted = run_lib.train(tiny_digits_config(n_iters=6, snapshot_freq=100, snapshot_freq_for_preemption=2),
                                str(tmp_path / 'a'))
  workdir = tmp_path / 'b'
  run_lib.train(tiny_digits_config(n_iters=4, snapshot_freq=100, snapshot_freq_for_preemption=2), str(workdir))
  latest = workdir / 'checkpoints-meta' / 'checkpoint_4.pth'
  latest.write_bytes(latest.read_bytes()[:1000])  # Truncated, as by a full disk outside our atomic writer.
  with caplog.at_level('WARNING'):
    resumed = run_lib.train(tiny_digits_config(n_iters=6, snapshot_freq=100, snapshot_freq_for_preemption=2),
                            str(workdir))
  assert 'checkpoint_4.pth' in caplog.text and 'truncated or corrupt' in caplog.text
  assert (workdir / 'checkpoints-meta' / 'checkpoint_4.pth.corrupt').is_file()  # Kept for inspection.
  expected, actual = flat_state(uninterrupted), flat_state(resumed)  # Resumed at 2, redid 3..6: same result.
  assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_only_unreadable_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints-meta').mkdir(parents=True)
  (workdir / 'checkpoints-meta' / 'checkpoint_2.pth').write_bytes(b'not a checkpoint')
  config = tiny_digits_config(n_iters=4, snapshot_freq=100, snapshot_freq_for_preemption=2)
  with pytest.raises(checkpoints.CheckpointReadError, match='Refusing to start from scratch'):
    run_lib.train(config, str(workdir))
  assert not (workdir / 'checkpoints-meta' / 'checkpoint_4.pth').exists()


# ---------------------------------------------------------------------------------------------------------------
# Kills and signals, on real processes.

def test_sigkill_at_half_way_then_restart_equals_an_uninterrupted_run(reference_run, tmp_path):
  workdir = tmp_path / 'killed'
  half = workdir / 'checkpoints-meta' / f'checkpoint_{N_ITERS // 2 // 10 * 10}.pth'
  with open(tmp_path / 'run.log', 'w') as log:
    process = subprocess.Popen(train_command(workdir), stdout=log, stderr=subprocess.STDOUT,
                               env=fault_injection.run_environment())
    wait_for(half.exists, process, tmp_path / 'run.log')
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
  fault_injection.run_to_completion(train_command(workdir), str(tmp_path / 'run.log'))
  fault_injection.assert_same_state(final_checkpoint(workdir), final_checkpoint(reference_run))
  losses, reference = fault_injection.logged_losses(workdir), fault_injection.logged_losses(reference_run)
  assert all(set(values) == set(reference[step]) for step, values in losses.items())  # Same data order and noise.


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(reference_run, tmp_path, signum):
  workdir = tmp_path / 'signalled'
  log_path = tmp_path / 'signalled.log'
  with open(log_path, 'w') as log:
    process = subprocess.Popen(train_command(workdir), stdout=log, stderr=subprocess.STDOUT,
                               env=fault_injection.run_environment())
    wait_for(lambda: len(fault_injection.logged_losses(workdir)) >= 3, process, log_path)
    process.send_signal(signum)
    process.wait(timeout=300)
  output = log_path.read_text()
  assert process.returncode == 128 + signum, output[-3000:]
  assert 'Traceback' not in output and f'{signal.Signals(signum).name} received' in output
  stopped_at = checkpoints.preemption_checkpoints(str(workdir))[0]
  step = torch.load(stopped_at, map_location='cpu', weights_only=True)['step']
  assert stopped_at.endswith(f'checkpoint_{step}.pth') and 3 <= step < N_ITERS
  assert max(fault_injection.logged_losses(workdir)) == step  # Nothing after the saved update was trained.
  if signum == signal.SIGTERM:
    fault_injection.run_to_completion(train_command(workdir), str(tmp_path / 'run.log'))
    fault_injection.assert_same_state(final_checkpoint(workdir), final_checkpoint(reference_run))


def test_a_second_ctrl_c_stops_at_once_without_finishing_the_update(tmp_path, caplog):
  """README: after a first Ctrl-C the current update finishes and its checkpoint is written; a second one stops at
  once (interruption.StopRequests raises KeyboardInterrupt). Real SIGINTs to this process, sent from the network's
  forward pass: the first in update 2's first micro-batch, the second in its second micro-batch, after the first was
  handled. Stopping at once is KeyboardInterrupt there: update 2 is not applied and not saved, where a graceful stop
  would finish it, save checkpoint_2.pth and raise TrainingInterrupted."""
  config = tiny_digits_config(n_iters=4, snapshot_freq=100, snapshot_freq_for_preemption=1, eval_freq=100,
                              grad_accum_steps=2)
  handled = 'SIGINT received: stopping after the current update'
  run = {'forwards': 0}

  def send_sigint(module, inputs):
    if not module.training:
      return
    run['forwards'] += 1  # Micro-batches of update u: forwards 2u - 1 and 2u.
    if run['forwards'] == 3:
      run['after_update_1'] = flat_state(run['state'])
      os.kill(os.getpid(), signal.SIGINT)
    elif run['forwards'] == 4:
      run['first_handled'] = handled in caplog.text  # The training went on after it, as it should.
      os.kill(os.getpid(), signal.SIGINT)

  def initialize(state):
    run['state'] = state
    state['model'].register_forward_pre_hook(send_sigint)

  default_handler = signal.getsignal(signal.SIGINT)
  with caplog.at_level('WARNING'), pytest.raises(KeyboardInterrupt):
    run_lib.run_training(config, str(tmp_path), train_batches=functools.partial(streams.data_batches, config),
                         eval_batches=lambda start, device: streams.held_out_data_batches(config, start, device),
                         initialize=initialize)
  assert signal.getsignal(signal.SIGINT) is default_handler
  assert run['forwards'] == 4 and run['first_handled'] and caplog.text.count(handled) == 1
  state = run['state']
  assert state['step'] == 1  # Update 2 was not finished: nothing of it was applied ...
  after_update_1, now = run['after_update_1'], flat_state(state)
  assert all(torch.equal(after_update_1[key], now[key]) for key in after_update_1)
  assert [os.path.basename(path) for path in checkpoints.preemption_checkpoints(str(tmp_path))] == [
      'checkpoint_1.pth']  # ... nor saved.


def test_fault_injection_loses_nothing(tmp_path):
  """A small run of tests/fault_injection.py (the full one is `python -m tests.fault_injection --kills 50`).

  A run that finishes before a kill lands ends its experiment early, so the counts are at least 1, not exactly 2;
  everything else (nothing lost, identical final state and pairs) is asserted inside the injection functions.
  """
  rng = random.Random(0)
  training = fault_injection.inject_training_faults(str(tmp_path), kills=2, rng=rng, n_iters=150)
  assert 1 <= training['training_kills'] <= 2
  assert training['max_updates_lost_at_a_kill'] <= fault_injection.PREEMPTION_INTERVAL
  pairs = fault_injection.inject_pair_faults(str(tmp_path), kills=2, rng=rng, teacher=training['teacher'], total=200)
  assert 1 <= pairs['pair_kills'] <= 2


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses.

def batches_with_nan_at(config, nan_steps):
  """Training batches of the config where the batches of the given (1-based) updates hold a NaN pixel."""

  def train_batches(start, device, generator):
    for step, batch in enumerate(streams.data_batches(config, start, device, generator), start=start + 1):
      if step in nan_steps:
        x1 = batch.x1.clone()
        x1[0, 0, 0, 0] = float('nan')
        batch = batch._replace(x1=x1)
      yield batch

  return train_batches


def run_with_nans(config, workdir, nan_steps):
  return run_lib.run_training(config, str(workdir), train_batches=batches_with_nan_at(config, nan_steps),
                              eval_batches=lambda start, device: streams.held_out_data_batches(config, start, device))


def test_a_non_finite_loss_skips_the_update_and_is_counted(tmp_path):
  config = tiny_digits_config(n_iters=4, snapshot_freq=100, snapshot_freq_for_preemption=2)
  clean = run_with_nans(config, tmp_path / 'clean', nan_steps=())
  state = run_with_nans(config, tmp_path / 'nan', nan_steps={4})
  assert state['step'] == 4 and state['nonfinite_steps'] == 1
  saved = torch.load(tmp_path / 'nan' / 'checkpoints-meta' / 'checkpoint_4.pth', map_location='cpu', weights_only=True)
  assert saved['nonfinite_steps'] == 1
  # Update 4 was skipped: weights, EMA and Adam equal those of a clean run of 3 updates.
  clean3 = run_with_nans(tiny_digits_config(n_iters=3, snapshot_freq=100, snapshot_freq_for_preemption=3),
                         tmp_path / 'clean3', nan_steps=())
  expected, actual = flat_state(clean3), flat_state(state)
  assert all(torch.equal(expected[key], actual[key]) for key in expected)
  assert not torch.equal(flat_state(clean)['param.0'], actual['param.0'])


def test_too_many_non_finite_losses_stop_the_run_with_its_last_good_checkpoint_intact(tmp_path):
  config = tiny_digits_config(n_iters=8, snapshot_freq=100, snapshot_freq_for_preemption=2)
  config.training.max_nonfinite_steps = 2
  with pytest.raises(run_lib.NonFiniteLossError, match=r'2 updates had a non-finite loss.*step 5.*checkpoint_4\.pth'):
    run_with_nans(config, tmp_path, nan_steps={3, 5})
  assert checkpoints.preemption_checkpoints(str(tmp_path))[0].endswith('checkpoint_4.pth')
  saved = torch.load(tmp_path / 'checkpoints-meta' / 'checkpoint_4.pth', map_location='cpu', weights_only=True)
  assert saved['step'] == 4 and saved['nonfinite_steps'] == 1
  assert all(torch.isfinite(value).all() for value in saved['model'].values() if value.is_floating_point())


@pytest.mark.parametrize('fused', [True, False], ids=['fused_adam', 'adam'])
def test_a_finite_loss_with_a_non_finite_gradient_skips_the_update_and_is_counted(fused):
  """The gradient-norm half of the check: the loss of the update is finite, one parameter's gradient is not (a hook
  replaces it by inf). Both Adam paths: fused (the skip decided on the device) and the default (a host read)."""
  config = tiny_digits_config(n_iters=3)
  config.optim.fused = fused
  device = torch.device('cpu')
  state = losses.build_training_state(config, device)
  params = [p for p in state['model'].parameters() if p.requires_grad]
  flow = losses.build_rectified_flow(config, state['model'])
  train_step = losses.get_step_fn(config, losses.get_loss_fn(config, flow), params, state['optimizer'],
                                  state['ema'], train=True, device=device,
                                  generator=torch.Generator().manual_seed(0))
  assert losses.skips_updates_on_device(state['optimizer']) == fused
  shape = (config.training.batch_size, config.data.num_channels, config.data.image_size, config.data.image_size)
  x1 = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2.0 - 1.0  # (B, C, H, W) in model space.
  micro_batches = [Batch(None, x1, slice(0, shape[0]))]
  assert torch.isfinite(train_step(state, micro_batches))  # A good update first: Adam and the EMA have state.
  before, ema_updates = flat_state(state), state['ema'].num_updates

  hook = params[0].register_hook(lambda grad: torch.full_like(grad, float('inf')))
  loss = train_step(state, micro_batches)
  hook.remove()
  assert torch.isfinite(loss) and state['step'] == 2
  after = flat_state(state)
  assert after.keys() == before.keys() and any(key.startswith('adam.') for key in after)
  changed = [key for key in before if not torch.equal(before[key], after[key])]
  assert not changed, f'the skipped update changed {len(changed)} tensors, e.g. {changed[:3]}'
  assert state['ema'].num_updates == ema_updates
  skipped = run_lib.count_skipped_updates(state, limit=20, last_good_checkpoint=None, since_step=1)
  assert skipped == 1 and state['nonfinite_steps'] == 1, 'the skipped update was not counted'

  train_step(state, micro_batches)  # The next finite update is made again.
  assert not torch.equal(flat_state(state)['param.0'], before['param.0'])
  assert run_lib.count_skipped_updates(state, limit=20, last_good_checkpoint=None, since_step=2) == 0


# ---------------------------------------------------------------------------------------------------------------
# Clear errors for bad input.

def test_an_image_size_that_does_not_fit_the_model_is_a_clear_error():
  config = tiny_digits_config()
  config.data.image_size = 18
  config.model.ch_mult = (1, 2, 2)
  with pytest.raises(ValueError, match=r'data.image_size=18 must be divisible by'):
    models.create_model(config)


def test_main_reports_input_errors_without_a_traceback(tmp_path):
  command = fault_injection.main_command(tmp_path / 'run', 'train', [
      '--config.data.dataset=IMAGE_FOLDER', f'--config.data.root={tmp_path / "no_such_folder"}'])
  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert 'error: data.root=' in result.stderr and 'is not a folder' in result.stderr
  with_traceback = subprocess.run([*command, '--traceback'], capture_output=True, text=True, timeout=300)
  assert with_traceback.returncode != 0 and 'Traceback' in with_traceback.stderr

