"""torchrun with 2 CPU processes (gloo) gives what 1 process gives: the same training, pairs and eval samples."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoints
from tests import fault_injection

REPO_ROOT = fault_injection.REPO_ROOT
STEPS = 3


def torchrun_command(workdir, mode, overrides, processes, launcher_flags=()):
  """main.py under torchrun (``processes`` >= 1) with --device=cpu (gloo), also where GPUs are visible: the
  comparisons below are of CPU arithmetic."""
  return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}',
          *launcher_flags, os.path.join(REPO_ROOT, 'main.py'), f'--config={fault_injection.DIGITS_CONFIG}',
          f'--workdir={workdir}', f'--mode={mode}', '--device=cpu', *overrides]


def launch(workdir, mode, overrides, processes, check=True):
  """Runs ``torchrun_command`` to its end, one thread per process."""
  environment = {**os.environ, 'OMP_NUM_THREADS': '1'}
  result = subprocess.run(torchrun_command(workdir, mode, overrides, processes), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env=environment)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def train_overrides(**extra):
  overrides = {**{key: value for key, value in (o[len('--config.'):].split('=', 1)
                                                 for o in fault_injection.tiny_overrides(STEPS))},
               'model.dropout': '0.0', 'training.snapshot_freq_for_preemption': str(STEPS),
               'sampling.snapshot_batch_size': '2', **extra}
  return [f'--config.{key}={value}' for key, value in overrides.items()]


def final_state(workdir):
  return fault_injection.training_state(os.path.join(workdir, 'checkpoints-meta', f'checkpoint_{STEPS}.pth'))


@pytest.fixture(scope='module')
def single_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_process')
  launch(workdir, 'train', train_overrides(), processes=1)
  return workdir


def assert_close_states(workdir, reference):
  step, tensors = final_state(workdir)
  reference_step, expected = final_state(reference)
  assert step == reference_step == STEPS
  assert tensors.keys() == expected.keys()
  for key in tensors:
    torch.testing.assert_close(tensors[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
  assert any(key.startswith('adam.') for key in tensors)  # Updates were made (Adam has state).


def test_two_processes_train_like_one_with_the_same_global_batch(single_process_run, tmp_path):
  launch(tmp_path, 'train', train_overrides(), processes=2)
  assert_close_states(tmp_path, single_process_run)
  # Only rank 0 wrote files: one log, one metrics stream.
  assert sorted(fault_injection.logged_losses(tmp_path)) == list(range(1, STEPS + 1))
  assert len(fault_injection.logged_losses(tmp_path)[1]) == 1


def test_gradient_accumulation_trains_like_one_large_batch(single_process_run, tmp_path):
  launch(tmp_path, 'train', train_overrides(**{'training.grad_accum_steps': '2'}), processes=2)
  assert_close_states(tmp_path, single_process_run)


def test_two_processes_train_a_class_conditional_model_like_one(tmp_path):
  """Labels and their dropout to the null class follow each sample's row of the global batch, not the rank."""
  conditional = train_overrides(**{'model.num_classes': '10', 'training.label_dropout': '0.5',
                                   'sampling.guidance_scale': '2.0'})
  launch(tmp_path / 'one', 'train', conditional, processes=1)
  launch(tmp_path / 'two', 'train', conditional, processes=2)
  assert_close_states(tmp_path / 'two', tmp_path / 'one')
  assert any('label_embedding' in key for key in final_state(tmp_path / 'one')[1])


@pytest.mark.parametrize('target', ['jvp', 'split', 'imf'])
def test_two_processes_train_a_meanflow_like_one(tmp_path, target):
  """training.objective='meanflow': the JVP runs through DDP's module, so its gradients are all-reduced like those of
  the rectified flow (a JVP on the plain network would leave each process with its own half's gradient); the split
  target's two gradient-free forwards and its split fractions follow each sample's row of the global batch."""
  # model.init_scale=1: with the default near-zero init u is about 0 in these 3 updates, and so is the split target
  # whatever the fractions (a per-rank draw of them passed unseen).
  meanflow = train_overrides(**{'training.objective': 'meanflow', 'model.time_inputs': '2', 'model.init_scale': '1.0',
                                'meanflow.interval_fraction': '0.5', 'meanflow.target': target,
                                'sampling.use_ode_sampler': 'mean_flow', 'sampling.sample_N': '1'})
  launch(tmp_path / 'one', 'train', meanflow, processes=1)
  launch(tmp_path / 'two', 'train', meanflow, processes=2)
  assert_close_states(tmp_path / 'two', tmp_path / 'one')
  assert any('interval_embedding' in key for key in final_state(tmp_path / 'one')[1])


def test_two_processes_train_on_latents_like_one(tmp_path):
  """A latent run: rank 0 encodes the cache while the other waits, and each sample's view and posterior draw follow
  its row of the global batch, not the rank."""
  from diffusers import AutoencoderKL

  torch.manual_seed(0)
  AutoencoderKL(in_channels=1, out_channels=1, down_block_types=('DownEncoderBlock2D',) * 2,
                up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=16).save_pretrained(str(tmp_path / 'vae'))
  runs = {}
  for processes in (1, 2):
    latent = train_overrides(**{'latent.autoencoder': str(tmp_path / 'vae'), 'latent.cache_dtype': 'float32',
                                'data.root': str(tmp_path / f'data_{processes}'), 'data.random_flip': 'True'})
    launch(tmp_path / str(processes), 'train', latent, processes=processes)
    runs[processes] = tmp_path / str(processes)
  assert_close_states(runs[2], runs[1])
  caches = [sorted(os.listdir(tmp_path / f'data_{processes}' / 'latent_cache')) for processes in (1, 2)]
  assert caches[0] == caches[1] and caches[0]  # The same caches, and nothing partial left.
  assert not [name for name in caches[0] if 'partial' in name or 'progress' in name]


def test_an_uneven_split_is_a_clear_error(tmp_path):
  result = launch(tmp_path, 'train', train_overrides(**{'training.batch_size': '6', 'training.grad_accum_steps': '2'}),
                  processes=2, check=False)
  assert result.returncode != 0
  assert 'training.batch_size=6 must split evenly over 2 processes x training.grad_accum_steps=2' in result.stderr


def worker_pids(launcher_pid):
  """{rank: pid} of the processes that torchrun ``launcher_pid`` started, read from /proc (Linux)."""
  pids = {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat', encoding='utf-8') as handle:
        parent = int(handle.read().rsplit(')', 1)[1].split()[1])  # The field after the state.
      if parent != launcher_pid:
        continue
      with open(f'/proc/{entry}/environ', 'rb') as handle:
        environment = dict(item.split(b'=', 1) for item in handle.read().split(b'\0') if b'=' in item)
    except OSError:  # A process that ended meanwhile.
      continue
    if b'RANK' in environment:
      pids[int(environment[b'RANK'])] = int(entry)
  return pids


@pytest.mark.skipif(not os.path.isdir('/proc'), reason="finds torchrun's workers in /proc")
def test_sigterm_to_one_process_stops_every_process_after_the_same_update(tmp_path):
  """README: SIGTERM stops all processes after the same update; they agree on it every training.log_freq updates.
  SIGTERM reaches rank 1 alone, the extreme case of a signal that reaches the processes at different moments (torchrun
  forwards its own SIGTERM to every rank, one after the other): rank 0, never signalled, stops after the same update,
  a multiple of log_freq, and writes its checkpoint."""
  log_freq, workdir, rank_logs = 2, tmp_path / 'run', tmp_path / 'rank_logs'
  overrides = train_overrides(**{'training.n_iters': '1000', 'training.snapshot_freq': '1000',
                                 'training.log_freq': str(log_freq)})
  command = torchrun_command(workdir, 'train', overrides, processes=2,
                             launcher_flags=[f'--log-dir={rank_logs}', '--redirects=3'])  # Each rank's own log.
  with open(tmp_path / 'torchrun.log', 'w', encoding='utf-8') as log:
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
      deadline = time.monotonic() + 300
      while not fault_injection.logged_losses(workdir):  # The training loop runs.
        assert launcher.poll() is None, (tmp_path / 'torchrun.log').read_text()[-3000:]
        assert time.monotonic() < deadline, 'timed out waiting for the first logged update'
        time.sleep(0.01)
      os.kill(worker_pids(launcher.pid)[1], signal.SIGTERM)
      deadline = time.monotonic() + 120
      while launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
      assert launcher.poll() is not None, 'the processes did not all stop within 120 s of the SIGTERM to rank 1'
    finally:
      if launcher.poll() is None:  # The workers first: each runs in its own session and would outlive torchrun.
        for pid in worker_pids(launcher.pid).values():
          with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
  launcher_output = (tmp_path / 'torchrun.log').read_text()
  stopped_after = {}
  for rank in (0, 1):
    (path,) = rank_logs.glob(f'*/attempt_0/{rank}/stderr.log')  # --redirects: the rank's stderr, i.e. its log.
    output = path.read_text()
    assert 'Traceback' not in output, output[-3000:]
    stopped_after[rank] = [int(step) for step in re.findall(r'SIGTERM received: stopped after update (\d+)', output)]
  assert len(stopped_after[0]) == 1 and stopped_after[0] == stopped_after[1], stopped_after
  step = stopped_after[0][0]
  assert step % log_freq == 0
  newest = checkpoints.preemption_checkpoints(str(workdir))[0]
  assert newest.endswith(f'checkpoint_{step}.pth')
  assert torch.load(newest, map_location='cpu', weights_only=True)['step'] == step
  assert max(fault_injection.logged_losses(workdir)) == step  # Nothing after the saved update was trained.
  # torchrun reports the exit codes of its failed workers: rank 1 exited with 128 + SIGTERM. Rank 0 does too, unless
  # torchrun, having seen rank 1 end first, sent it SIGTERM while it was exiting (after its checkpoint): then -15.
  exit_codes = {int(rank): int(code) for rank, code in
                re.findall(r'rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)', launcher_output)}
  assert exit_codes[1] == 128 + signal.SIGTERM and exit_codes[0] in (128 + signal.SIGTERM, -signal.SIGTERM), exit_codes
  assert launcher.returncode != 0  # A stopped run does not look finished to a scheduler.


def pair_and_eval_overrides(teacher, data_root):
  return [*train_overrides(), '--config.reflow.reflow_type=generate_data_from_z0',
          f'--config.reflow.last_flow_ckpt={teacher}', f'--config.reflow.data_root={data_root}',
          '--config.reflow.total_number_of_samples=22', '--config.reflow.pairs_per_shard=4',
          '--config.sampling.sample_N=4']


def test_pairs_and_eval_samples_do_not_depend_on_the_number_of_processes(single_process_run, tmp_path,
                                                                        random_inception_weights):
  teacher = single_process_run / 'checkpoints' / 'checkpoint_1.pth'
  for processes in (1, 2):
    launch(tmp_path / f'run_{processes}', 'reflow',
           pair_and_eval_overrides(teacher, tmp_path / f'pairs_{processes}'), processes)
  z0, z1 = fault_injection.read_pairs(str(tmp_path / 'pairs_1'))
  z0_two, z1_two = fault_injection.read_pairs(str(tmp_path / 'pairs_2'))
  assert len(z0) == 22 and torch.equal(z0, z0_two) and torch.equal(z1, z1_two)

  stats = tmp_path / 'stats.npz'
  np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
  eval_overrides = [*train_overrides(), '--config.eval.begin_ckpt=1', '--config.eval.end_ckpt=1',
                    '--config.eval.enable_sampling=True', '--config.eval.num_samples=12', '--config.eval.batch_size=4',
                    f'--config.eval.stats_path={stats}',
                    f'--config.eval.inception_weights_path={random_inception_weights}',
                    '--config.eval.kid_subset_size=4', '--config.sampling.sample_N=4']
  rounds, reports = {}, {}
  for processes in (1, 2):
    launch(single_process_run, 'eval', [*eval_overrides, f'--eval_folder=eval_{processes}'], processes)
    folder = single_process_run / f'eval_{processes}' / 'ckpt_1'
    rounds[processes] = [dict(np.load(folder / f'round_{i:05d}.npz')) for i in range(3)]
    reports[processes] = json.loads((single_process_run / f'eval_{processes}' / 'report_1.json').read_text())
  for one, two in zip(rounds[1], rounds[2]):  # Round 1 was made by the second process.
    assert np.array_equal(one['images'], two['images'])
    np.testing.assert_allclose(one['pool_3'], two['pool_3'], rtol=1e-5, atol=1e-6)
  assert reports[1]['num_samples'] == reports[2]['num_samples'] == 12
  assert reports[1]['fid'] == pytest.approx(reports[2]['fid'], rel=1e-6)
