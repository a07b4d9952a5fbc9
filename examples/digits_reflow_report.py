"""Does reflow work on the digits demo? Straightness and one-step sample quality of each stage.

For every checkpoint given (EMA weights) it reports, on the same 1,000 noises:
  - straightness S(Z) of 100-step Euler trajectories (Liu et al. 2022, Def. 2.3; 0 = straight);
  - FD-1: the Frechet distance between one-step samples x0 + v(x0, eps) and the 1,797 real digits, in the 64-d
    penultimate features of a small CNN digit classifier trained here on the digits (fixed seed);
  - FD-RK45 and its NFE: the same distance for adaptive RK45 samples (tolerance 1e-3), the flow's own quality.

  python examples/digits_reflow_report.py            # the checkpoints of the digits pipeline (docs/digits.md)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluation
import evaluation_digits
import losses
import reflow
from configs.rectified_flow.digits_reflow_demo import ONE_RF_CHECKPOINT, TWO_RF_CHECKPOINT
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config
from rectified_flow_pytorch import flow_math, solvers

DISTILLED_CHECKPOINT = 'logs/digits_demo_2rf_distill/checkpoints/checkpoint_3.pth'


def report(checkpoints, num=1000, seed=12345):
  config = get_config()
  device = torch.device('cpu')
  classifier, accuracy = evaluation_digits.train_classifier()
  real, _, held_out = evaluation_digits.real_digits()
  frechet = evaluation_digits.frechet_distance_digits
  print(f'digit classifier: held-out accuracy {accuracy:.3f}; FD(train digits, held-out digits) = '
        f'{frechet(classifier, real[~held_out], real[held_out]):.2f}')
  noise = flow_math.indexed_noise(seed, 0, num, (1, 16, 16))
  eps = config.training.time_eps
  rows = []
  for name, path in checkpoints:
    if not os.path.isfile(path):
      print(f'{name}: {path} not found, skipped')
      continue
    config.reflow.last_flow_ckpt = path
    net, _ = reflow.load_teacher(config, device)
    flow = losses.build_rectified_flow(config, net)
    straightness = evaluation.straightness(flow.velocity, noise, steps=100, eps=eps).mean().item()
    one_step, _ = solvers.euler(flow.velocity, noise, steps=1, t0=eps, step_size=1.0)
    many_step, nfe = solvers.rk45(flow.velocity, noise, t0=eps, t1=1.0, rtol=1e-3, atol=1e-3)
    rows.append((name, straightness, frechet(classifier, one_step, real), frechet(classifier, many_step, real), nfe))
  print(f'{"model":<28} {"straightness":>12} {"FD-1 (1 step)":>14} {"FD-RK45":>9} {"NFE":>5}')
  for name, straightness, fd1, fd_rk45, nfe in rows:
    print(f'{name:<28} {straightness:>12.4f} {fd1:>14.2f} {fd_rk45:>9.2f} {nfe:>5d}')
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--one_rf', default=ONE_RF_CHECKPOINT)
  parser.add_argument('--two_rf', default=TWO_RF_CHECKPOINT)
  parser.add_argument('--distilled', default=DISTILLED_CHECKPOINT)
  parser.add_argument('--num', type=int, default=1000, help='noises per model')
  args = parser.parse_args()
  report([('1-rectified flow', args.one_rf), ('2-rectified flow', args.two_rf),
          ('2-RF + one-step distillation', args.distilled)], num=args.num)


if __name__ == '__main__':
  main()
