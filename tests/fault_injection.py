"""Fault injection: SIGKILL training and pair generation at random moments, restart them, check that nothing is lost.

    python -m tests.fault_injection --kills 50 --seed 0

Training: a tiny digits run is killed ``--kills`` times (some kills during start-up, most at a random moment of the
training loop, so some land inside checkpoint writes) and restarted until it finishes. Checked: after every kill the
run resumes from a checkpoint at most ``snapshot_freq_for_preemption`` updates behind the last logged update; every
update that was redone logged the same loss as before (same data, noise and weights); the final weights, EMA and
optimiser state equal, bit for bit, those of an uninterrupted run. Pair generation: killed likewise; checked: the
final pairs equal an uninterrupted generation's shard for shard, with no pair missing or duplicated. The counts are
printed at the end. ``tests/test_reliability.py`` runs a few kills of each. Every run is on the CPU (``--device=cpu``),
also on a machine with a GPU: bit-exact repetition is the CPU's guarantee.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(REPO_ROOT, 'configs', 'rectified_flow', 'digits_rf_gaussian_ddpmpp_demo.py')
PREEMPTION_INTERVAL = 10


def tiny_overrides(n_iters):
  """A small digits model that trains at tens of updates per second on a CPU core."""
  return [f'--config.training.n_iters={n_iters}', f'--config.training.snapshot_freq={n_iters}',
          f'--config.training.snapshot_freq_for_preemption={PREEMPTION_INTERVAL}',
          '--config.training.keep_preemption_checkpoints=2', '--config.training.log_freq=1',
          '--config.training.eval_freq=1000000', '--config.training.batch_size=8', '--config.model.nf=16',
          '--config.model.ch_mult=(1,2)', '--config.model.attn_resolutions=(8,)', '--config.model.dropout=0.1',
          '--config.sampling.use_ode_sampler=euler', '--config.sampling.sample_N=2',
          '--config.sampling.snapshot_batch_size=4', '--config.data.num_workers=0',
          '--config.training.precision=fp32']  # Not 'auto': runs compared across process counts stay fp32.


def main_command(workdir, mode, overrides, device='cpu'):
  """``main.py`` on the digits config; on the CPU unless ``device`` says otherwise (None: the config's choice).

  The CPU is pinned because what these runs check, bit-exact repetition across kills and restarts, is a CPU
  guarantee; a GPU machine runs them on its CPU too.
  """
  device_flag = [f'--device={device}'] if device is not None else []
  return [sys.executable, os.path.join(REPO_ROOT, 'main.py'), f'--config={DIGITS_CONFIG}', f'--workdir={workdir}',
          f'--mode={mode}', *device_flag, *overrides]


def run_environment():
  """The environment of the runs started here: one intra-op thread each. The tiny model gains nothing from more,
  and with two threads on two shared cores, threads waiting for a busy core made a 30-update run 6 to 16 times
  slower (62-157 s against 9-10 s)."""
  return {**os.environ, 'OMP_NUM_THREADS': '1'}


def run_to_completion(command, log_path):
  with open(log_path, 'a', encoding='utf-8') as log:
    result = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=1800,
                            env=run_environment())
  if result.returncode != 0:
    raise RuntimeError(f'{command} failed with exit code {result.returncode}; see {log_path}')


def run_with_kills(command, kills, rng, log_path, progress, on_kill=None):
  """Runs ``command`` until it exits 0, SIGKILLing it ``kills`` times first.

  A quarter of the kills land at a random moment of start-up; the rest wait until ``progress()`` (a marker of the
  files the work writes) has changed since the launch, so that this process is working, then a random 0-1.5 s.
  Returns the number of kills delivered (a run that finished before its kill
  ends the experiment early: give it enough updates or pairs for the kills asked for).
  """
  delivered = 0
  with open(log_path, 'a', encoding='utf-8') as log:
    while True:
      baseline = progress()
      process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env=run_environment())
      if delivered < kills:
        deadline = None
        if rng.random() < 0.25:
          deadline = time.monotonic() + rng.uniform(0.0, 6.0)
        while process.poll() is None:
          if deadline is None and progress() != baseline:
            deadline = time.monotonic() + rng.uniform(0.0, 1.5)
          if deadline is not None and time.monotonic() >= deadline:
            process.send_signal(signal.SIGKILL)
            process.wait()
            delivered += 1
            if on_kill is not None:
              on_kill()
            break
          time.sleep(0.01)
        if process.returncode == -signal.SIGKILL:
          continue
      if process.wait() != 0:
        raise RuntimeError(f'{command} failed with exit code {process.returncode}; see {log_path}')
      return delivered


def file_size(path):
  return os.path.getsize(path) if os.path.exists(path) else 0


def logged_losses(workdir):
  """{step: [training losses logged for it, by every attempt]} from metrics.jsonl."""
  losses = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return losses
  with open(path, encoding='utf-8') as handle:
    for line in handle:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # The line a kill cut short.
        continue
      if 'training_loss' in record:
        losses.setdefault(record['step'], []).append(record['training_loss'])
  return losses


def newest_checkpoint_step(workdir):
  folder = os.path.join(workdir, 'checkpoints-meta')
  steps = [int(name[len('checkpoint_'):-len('.pth')]) for name in os.listdir(folder)
           if name.startswith('checkpoint_') and name.endswith('.pth')] if os.path.isdir(folder) else []
  return max(steps, default=0)


def training_state(path):
  checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  tensors = {f'model.{k}': v for k, v in checkpoint['model'].items()}
  tensors.update({f'ema.{i}': v for i, v in enumerate(checkpoint['ema']['shadow_params'])})
  for index, values in checkpoint['optimizer']['state'].items():
    tensors.update({f'adam.{index}.{k}': v for k, v in values.items()})
  return checkpoint['step'], tensors


def assert_same_state(path, reference_path):
  step, tensors = training_state(path)
  reference_step, reference = training_state(reference_path)
  assert step == reference_step, (step, reference_step)
  assert tensors.keys() == reference.keys()
  different = [key for key in tensors if not torch.equal(tensors[key], reference[key])]
  assert not different, f'{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}'


def inject_training_faults(root, kills, rng, n_iters=200):
  """Returns the counts of the training experiment; raises AssertionError when anything was lost."""
  reference = os.path.join(root, 'train_reference')
  run_to_completion(main_command(reference, 'train', tiny_overrides(n_iters)), os.path.join(root, 'reference.log'))
  workdir = os.path.join(root, 'train_killed')
  os.makedirs(workdir, exist_ok=True)
  lost_updates = []
  metrics_path = os.path.join(workdir, 'metrics.jsonl')

  def on_kill():
    reached = max(logged_losses(workdir), default=0)
    lost_updates.append(reached - newest_checkpoint_step(workdir))

  delivered = run_with_kills(main_command(workdir, 'train', tiny_overrides(n_iters)), kills, rng,
                             os.path.join(root, 'killed.log'), progress=lambda: file_size(metrics_path),
                             on_kill=on_kill)
  assert max(lost_updates, default=0) <= PREEMPTION_INTERVAL, lost_updates
  losses, reference_losses = logged_losses(workdir), logged_losses(reference)
  assert sorted(losses) == list(range(1, n_iters + 1)), 'some update was never logged'
  redone = {step: values for step, values in losses.items() if len(values) > 1}
  for step, values in losses.items():
    assert set(values) == set(reference_losses[step]), (
        f'update {step} logged {values}, uninterrupted {reference_losses[step]}')
  final = f'checkpoint_{n_iters}.pth'
  assert_same_state(os.path.join(workdir, 'checkpoints-meta', final),
                    os.path.join(reference, 'checkpoints-meta', final))
  assert_same_state(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth'),
                    os.path.join(reference, 'checkpoints', 'checkpoint_1.pth'))
  return {'training_kills': delivered, 'updates': n_iters, 'updates_redone': sum(len(v) - 1 for v in redone.values()),
          'max_updates_lost_at_a_kill': max(lost_updates, default=0),
          'preemption_interval': PREEMPTION_INTERVAL, 'teacher': os.path.join(reference, 'checkpoints',
                                                                             'checkpoint_1.pth')}


def pair_overrides(teacher, data_root, total):
  return [*tiny_overrides(1), '--config.reflow.reflow_type=generate_data_from_z0',
          f'--config.reflow.last_flow_ckpt={teacher}', f'--config.reflow.data_root={data_root}',
          f'--config.reflow.total_number_of_samples={total}', '--config.reflow.pairs_per_shard=4',
          '--config.sampling.sample_N=20']


def read_pairs(data_root):
  from datasets import reflow_pairs

  pairs = reflow_pairs.PairShards(data_root)
  z0 = torch.stack([pairs[i].x0 for i in range(len(pairs))])
  z1 = torch.stack([pairs[i].x1 for i in range(len(pairs))])
  return z0, z1


def inject_pair_faults(root, kills, rng, teacher, total=400):
  """Returns the counts of the pair-generation experiment; raises AssertionError when a pair is wrong."""
  reference_root, killed_root = os.path.join(root, 'pairs_reference'), os.path.join(root, 'pairs_killed')
  run_to_completion(main_command(os.path.join(root, 'pairs_run'), 'reflow', pair_overrides(teacher, reference_root,
                                                                                            total)),
                    os.path.join(root, 'pairs_reference.log'))

  def progress():  # The manifest is rewritten after every shard.
    path = os.path.join(killed_root, 'seed_42', 'manifest.json')
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None

  shards_at_kill = []

  def on_kill():
    folder = os.path.join(killed_root, 'seed_42')
    shards_at_kill.append(sum(name.startswith('shard_') and name.endswith('.npy') for name in os.listdir(folder))
                          if os.path.isdir(folder) else 0)

  delivered = run_with_kills(main_command(os.path.join(root, 'pairs_run'), 'reflow',
                                          pair_overrides(teacher, killed_root, total)),
                             kills, rng, os.path.join(root, 'pairs_killed.log'), progress=progress, on_kill=on_kill)
  z0, z1 = read_pairs(killed_root)
  reference_z0, reference_z1 = read_pairs(reference_root)
  assert len(z0) == total, f'{len(z0)} pairs instead of {total}'
  assert len(torch.unique(z0.flatten(1), dim=0)) == total, 'a pair is duplicated'
  assert torch.equal(z0, reference_z0) and torch.equal(z1, reference_z1), 'pairs differ from an uninterrupted run'
  folder = os.path.join(killed_root, 'seed_42')
  assert not [name for name in os.listdir(folder) if '.tmp-' in name], 'a temporary file was left behind'
  return {'pair_kills': delivered, 'pairs': total, 'shards': -(-total // 4),
          'shards_done_at_each_kill': shards_at_kill}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kills', type=int, default=50, help='SIGKILLs for each of training and pair generation')
  parser.add_argument('--seed', type=int, default=0, help='seed of the kill moments')
  parser.add_argument('--updates', type=int, default=2000, help='training updates of the killed run')
  parser.add_argument('--pairs', type=int, default=3200, help='pairs of the killed generation (4 per shard)')
  parser.add_argument('--workdir', default='', help='keep the runs here (default: a temporary folder, removed)')
  args = parser.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix='fault_injection_')
  os.makedirs(root, exist_ok=True)
  rng = random.Random(args.seed)
  start = time.time()
  try:
    training = inject_training_faults(root, args.kills, rng, n_iters=args.updates)
    pairs = inject_pair_faults(root, args.kills, rng, training.pop('teacher'), total=args.pairs)
  finally:
    if not args.workdir:
      shutil.rmtree(root, ignore_errors=True)
  at_kill = pairs.pop('shards_done_at_each_kill')
  print(json.dumps({**training, **pairs, 'minutes': round((time.time() - start) / 60, 1)}, indent=2))
  print(f'shards finished at the kills (of {pairs["shards"]}): {at_kill}')
  print('OK: nothing lost beyond the preemption interval; final weights, EMA, optimiser and pairs equal an '
        'uninterrupted run')


if __name__ == '__main__':
  main()
