"""Updates/s of the digits demo's training loop (``make demo``) with today's defaults against the earlier settings.

Each setting trains the demo config (DDPM++ on 16x16 digits, batch 64) for ``--updates`` updates in its own
process and reads the loop's own images/s from metrics.jsonl (the mean over the logged windows after the first,
so start-up and the first, slower updates stay out). The baseline is the settings the demo had before the
GPU-first step: fp32, Adam without the fused kernel, the data loader. Settings run in turn, ``--repeats`` rounds,
and each keeps its best round, so a slow moment of a shared machine does not decide a ratio.

  python benchmarks/demo_speed.py --updates 300
  git worktree add /tmp/before <commit> && python benchmarks/demo_speed.py --reference-tree /tmp/before

``--reference-tree`` adds a row for another checkout's ``main.py`` with its own defaults (e.g. the commit before a
change), run in the same rounds; ratios stay against the first row.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, 'configs', 'rectified_flow', 'digits_rf_gaussian_ddpmpp_demo.py')
BASELINE = ['--config.training.precision=fp32', '--config.optim.fused=False', '--config.data.device_resident=False']
SETTINGS = (
    ('before: fp32, Adam, data loader (baseline)', BASELINE),
    ('fp32, fused Adam, data loader', ['--config.training.precision=fp32', '--config.data.device_resident=False']),
    ('fp32, fused Adam, resident data', ['--config.training.precision=fp32']),
    ('default (precision auto, fused Adam, resident data)', []),
)


def run_demo(workdir, device, overrides, tree=REPO_ROOT, env=None, timeout=None):
  """``main.py --mode train`` of ``tree`` on its demo config in ``workdir`` with the flags ``overrides``; (the
  completed process, its output captured, and its wall seconds). A failed run is returned, not raised; one that
  runs past ``timeout`` seconds raises ``subprocess.TimeoutExpired``."""
  device_flag = [f'--device={device}'] if tree == REPO_ROOT else []  # Older checkouts may lack the flag.
  command = [sys.executable, os.path.join(tree, 'main.py'), f'--config={CONFIG.replace(REPO_ROOT, tree)}',
             f'--workdir={workdir}', '--mode=train', *device_flag, *overrides]
  started = time.perf_counter()
  completed = subprocess.run(command, capture_output=True, text=True, cwd=tree, env=env, timeout=timeout)
  return completed, time.perf_counter() - started


def read_run(workdir):
  """(the records of metrics.jsonl, config.json) of a training run in ``workdir``."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as handle:
    records = [json.loads(line) for line in handle]
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as handle:
    return records, json.load(handle)


def loop_image_rates(records):
  """The images/s the training loop logged, per window, after the first (start-up and the first, slower updates)."""
  return [r['images_per_second'] for r in records if 'images_per_second' in r][1:]


def loop_updates_per_second(overrides, updates, root, device, tree=REPO_ROOT):
  workdir = os.path.join(root, str(len(os.listdir(root))))
  completed, _ = run_demo(workdir, device, [f'--config.training.n_iters={updates}',
                                           '--config.training.snapshot_sampling=False', *overrides], tree)
  completed.check_returncode()
  records, config = read_run(workdir)
  return float(np.mean(loop_image_rates(records))) / config['training']['batch_size']


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--updates', type=int, default=300, help='updates per setting (logged every 25)')
  parser.add_argument('--repeats', type=int, default=2, help='rounds over all settings; each keeps its best')
  parser.add_argument('--device', default='cpu')
  parser.add_argument('--reference-tree', default='', help='another checkout whose main.py runs with its defaults')
  args = parser.parse_args()
  settings = [(label, overrides, REPO_ROOT) for label, overrides in SETTINGS]
  if args.reference_tree:
    settings.append((f'{args.reference_tree} (its defaults)', [], os.path.abspath(args.reference_tree)))
  best = {label: 0.0 for label, _, _ in settings}
  with tempfile.TemporaryDirectory() as root:
    for round_index in range(args.repeats):
      for label, overrides, tree in settings:
        rate = loop_updates_per_second(overrides, args.updates, root, args.device, tree)
        best[label] = max(best[label], rate)
        print(f'round {round_index + 1}: {label}: {rate:.2f} updates/s', flush=True)
  baseline = best[SETTINGS[0][0]]
  print(f'\ndigits demo training loop on {args.device}, {args.updates} updates per run, best of {args.repeats}')
  print(f'{"setting":<54}{"updates/s":>10}{"x before":>10}{"3,000 updates":>15}')
  for label, rate in best.items():
    print(f'{label:<54}{rate:>10.2f}{rate / baseline:>10.2f}{3000 / rate / 60:>12.1f} min')


if __name__ == '__main__':
  main()
