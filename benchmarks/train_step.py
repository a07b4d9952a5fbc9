"""Images/s of a full-size CIFAR-10 DDPM++ train step, against this machine's own fp32 matmul FLOP/s.

One step is what ``--mode train`` runs: forward, backward, gradient clipping, Adam and the EMA update
(``losses.get_step_fn``). FLOPs per step are counted with ``torch.utils.flop_counter``; the peak is the best
FLOP/s of a square fp32 matmul measured in the same run.

  python benchmarks/train_step.py --batch 8 --steps 5
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import run_lib  # noqa: E402
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config  # noqa: E402


def synchronize(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def matmul_flops_per_second(device, size, repeats):
  """Best FLOP/s of an fp32 (size x size) @ (size x size) matmul over ``repeats`` timed runs."""
  a = torch.randn(size, size, device=device)
  b = torch.randn(size, size, device=device)
  a @ b
  best = float('inf')
  for _ in range(repeats):
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=8, help='images per train step')
  parser.add_argument('--steps', type=int, default=5, help='timed steps (after one warm-up step)')
  parser.add_argument('--matmul-size', type=int, default=2048, help='side of the square matmul for the peak')
  args = parser.parse_args()

  device = run_lib.select_device()
  config = get_config()
  config.training.batch_size = args.batch
  torch.manual_seed(0)
  state = run_lib.build_training_state(config, device)
  flow = losses.build_rectified_flow(config, state['model'])
  step_fn = losses.get_step_fn(config, flow, state['optimizer'], state['ema'], train=True)
  batch = torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1

  with FlopCounterMode(display=False) as counter:
    step_fn(state, batch)  # Warm-up step, also counts FLOPs.
  flops_per_step = counter.get_total_flops()

  times = []
  for _ in range(args.steps):
    synchronize(device)
    start = time.perf_counter()
    step_fn(state, batch)
    synchronize(device)
    times.append(time.perf_counter() - start)
  step_seconds = sorted(times)[len(times) // 2]

  peak = matmul_flops_per_second(device, args.matmul_size, repeats=10)
  achieved = flops_per_step / step_seconds
  params = sum(p.numel() for p in state['model'].parameters())
  print(f'device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}')
  print(f'model: CIFAR-10 DDPM++, {params:,} parameters, batch {args.batch}, fp32 eager')
  print(f'train step: median {step_seconds * 1000:.1f} ms over {args.steps} steps -> '
        f'{args.batch / step_seconds:.2f} images/s')
  print(f'FLOPs per step: {flops_per_step / 1e9:.1f} GFLOP ({flops_per_step / args.batch / 1e9:.1f} GFLOP/image, '
        f'forward + backward)')
  print(f'fp32 matmul peak ({args.matmul_size}^3): {peak / 1e12:.3f} TFLOP/s')
  print(f'train step achieves {achieved / 1e12:.3f} TFLOP/s = {achieved / peak:.1%} of the fp32 matmul peak')


if __name__ == '__main__':
  main()
