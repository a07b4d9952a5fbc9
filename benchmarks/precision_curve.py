"""Training curves of fp32, bf16 and fp16 on the same data and noise: does reduced precision train the same model?

Trains the digits demo model (DDPM++, 16x16, no download) for ``--steps`` updates once per precision, from the same
seed (same batches, noise and times), and prints the mean training loss over windows of updates for each, with
the difference to fp32 in units of the standard error of the fp32 window mean (the step-to-step noise of the
loss). Differences of a few standard errors or less mean "the same curve within noise".

  python benchmarks/precision_curve.py --steps 300
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_lib  # noqa: E402
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config  # noqa: E402


def training_losses(precision, steps, workdir):
  config = get_config()
  config.training.n_iters = steps
  config.training.precision = precision
  config.training.log_freq = 1
  config.training.eval_freq = 10 ** 9
  config.training.snapshot_freq = steps
  config.training.snapshot_freq_for_preemption = steps
  config.training.snapshot_sampling = False
  run_lib.train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as handle:
    records = [json.loads(line) for line in handle]
  return np.array([r['training_loss'] for r in records if 'training_loss' in r])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--window', type=int, default=50)
  parser.add_argument('--precisions', default='fp32,bf16,fp16')
  args = parser.parse_args()
  curves = {}
  with tempfile.TemporaryDirectory() as root:
    for precision in args.precisions.split(','):
      curves[precision] = training_losses(precision, args.steps, os.path.join(root, precision))
  reference = curves['fp32']
  print(f'digits DDPM++ (demo config), {args.steps} updates of batch 64, same seed; mean training loss per window')
  print(f'{"updates":<12}' + ''.join(f'{name:>10}' for name in curves)
        + ''.join(f'{name + " - fp32":>16}' for name in curves if name != 'fp32'))
  for start in range(0, args.steps, args.window):
    window = slice(start, start + args.window)
    standard_error = reference[window].std(ddof=1) / np.sqrt(len(reference[window]))
    row = f'{start + 1:>4}-{min(start + args.window, args.steps):<7}'
    row += ''.join(f'{curve[window].mean():>10.4f}' for curve in curves.values())
    differences = [curve[window].mean() - reference[window].mean() for name, curve in curves.items() if name != 'fp32']
    row += ''.join(f'{difference:>+9.4f} ({difference / standard_error:+.1f} se)' for difference in differences)
    print(row)


if __name__ == '__main__':
  main()
