"""Images/s and peak memory of a full-size train step, against this machine's own fp32 matmul FLOP/s.

One step is what ``--mode train`` runs: forward, backward, gradient clipping, Adam and the EMA update
(``losses.get_step_fn``). FLOPs per step are counted with ``torch.utils.flop_counter``; the peak is the best
FLOP/s of a square fp32 matmul measured in the same run. Peak memory is the growth of the process's peak RSS
during the step (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA); each configuration runs in its own process.

  python benchmarks/train_step.py                           # CIFAR-10 DDPM++ at batch 8
  python benchmarks/train_step.py --model ncsnpp256 --batch 1
  python benchmarks/train_step.py --all                     # both models: DDPM++ batch 8, NCSN++ 256 batch 1 and 2
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import run_lib  # noqa: E402
from configs.rectified_flow.celeba_hq_pytorch_rf_gaussian import get_config as ncsnpp256_config  # noqa: E402
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as ddpmpp_config  # noqa: E402

MODELS = {'ddpmpp': ('CIFAR-10 DDPM++ 32x32', ddpmpp_config),
          'ncsnpp256': ('CelebA-HQ NCSN++ 256x256', ncsnpp256_config)}


def synchronize(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def peak_rss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


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


def benchmark(model, batch, steps, matmul_size):
  name, get_config = MODELS[model]
  device = run_lib.select_device()
  config = get_config()
  config.training.batch_size = batch
  torch.manual_seed(0)
  state = run_lib.build_training_state(config, device)
  flow = losses.build_rectified_flow(config, state['model'])
  params = list(state['model'].parameters())
  step_fn = losses.get_step_fn(config, losses.get_loss_fn(config, flow), params, state['optimizer'], state['ema'],
                               train=True)
  size = config.data.image_size
  batch_data = torch.rand(batch, config.data.num_channels, size, size, device=device) * 2 - 1
  rss_before = peak_rss_bytes()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()

  with FlopCounterMode(display=False) as counter:
    step_fn(state, None, batch_data)  # Warm-up step, also counts FLOPs.
  flops_per_step = counter.get_total_flops()
  times = []
  for _ in range(steps):
    synchronize(device)
    start = time.perf_counter()
    step_fn(state, None, batch_data)
    synchronize(device)
    times.append(time.perf_counter() - start)
  step_seconds = sorted(times)[len(times) // 2]
  peak_memory = (torch.cuda.max_memory_allocated() if device.type == 'cuda'
                 else peak_rss_bytes() - rss_before)

  peak = matmul_flops_per_second(device, matmul_size, repeats=10)
  achieved = flops_per_step / step_seconds
  n_params = sum(p.numel() for p in params)
  print(f'device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}')
  print(f'model: {name}, {n_params:,} parameters, batch {batch}, fp32 eager')
  print(f'train step: median {step_seconds * 1000:.1f} ms over {steps} steps -> {batch / step_seconds:.2f} images/s')
  print(f'FLOPs per step: {flops_per_step / 1e9:.1f} GFLOP ({flops_per_step / batch / 1e9:.1f} GFLOP/image, '
        f'forward + backward)')
  print(f'peak memory of the step: {peak_memory / 2**30:.2f} GiB '
        f'({"CUDA max allocated" if device.type == "cuda" else "growth of peak RSS"})')
  print(f'fp32 matmul peak ({matmul_size}^3): {peak / 1e12:.3f} TFLOP/s')
  print(f'train step achieves {achieved / 1e12:.3f} TFLOP/s = {achieved / peak:.1%} of the fp32 matmul peak')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', choices=sorted(MODELS), default='ddpmpp')
  parser.add_argument('--batch', type=int, default=8, help='images per train step')
  parser.add_argument('--steps', type=int, default=5, help='timed steps (after one warm-up step)')
  parser.add_argument('--matmul-size', type=int, default=2048, help='side of the square matmul for the peak')
  parser.add_argument('--all', action='store_true', help='DDPM++ batch 8, NCSN++ 256 batch 1 and 2, one process each')
  args = parser.parse_args()
  if args.all:
    for model, batch, steps in (('ddpmpp', 8, args.steps), ('ncsnpp256', 1, 3), ('ncsnpp256', 2, 3)):
      print(f'--- {model}, batch {batch}', flush=True)
      subprocess.run([sys.executable, os.path.abspath(__file__), '--model', model, '--batch', str(batch),
                      '--steps', str(steps), '--matmul-size', str(args.matmul_size)], check=True)
    return
  benchmark(args.model, args.batch, args.steps, args.matmul_size)


if __name__ == '__main__':
  main()
