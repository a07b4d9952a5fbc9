"""Images/s and peak memory of a full-size train step, against this machine's own fp32 matmul FLOP/s.

One step is what ``--mode train`` runs: forward, backward, gradient clipping, Adam and the EMA update
(``losses.get_step_fn``). FLOPs per step are counted with ``torch.utils.flop_counter``; the peak is the best
FLOP/s of a square fp32 matmul measured in the same run. Peak memory is the growth of the process's peak RSS
during the step (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA); each configuration runs in its own process.

  python benchmarks/train_step.py                           # CIFAR-10 DDPM++ at batch 8
  python benchmarks/train_step.py --model ncsnpp256 --batch 1
  python benchmarks/train_step.py --all                     # both models: DDPM++ batch 8, NCSN++ 256 batch 1 and 2
  python benchmarks/train_step.py --options                 # DDPM++ batch 8: each speed option against fp32 eager

``--options`` runs plain fp32 eager first (the baseline, in the same run) and then bf16, bf16 + channels_last,
fp16 (grad scaler), channels_last alone and torch.compile variants, each in its own process, and prints
images/s as a ratio to the baseline and peak memory. Whether an option trains the same model is the business of
``benchmarks/precision_curve.py`` (loss curves over hundreds of updates); a few steps of a freshly initialised
DDPM++ (zero-initialised output layer, learning rate still warming up) cannot tell.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import run_lib  # noqa: E402
from benchmarks.timing import peak_rss_bytes, timed, timed_call  # noqa: E402
from configs.rectified_flow.celeba_hq_pytorch_rf_gaussian import get_config as ncsnpp256_config  # noqa: E402
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as ddpmpp_config  # noqa: E402
from datasets import Batch  # noqa: E402
from speed.precision import PRECISIONS  # noqa: E402

MODELS = {'ddpmpp': ('CIFAR-10 DDPM++ 32x32', ddpmpp_config),
          'ncsnpp256': ('CelebA-HQ NCSN++ 256x256', ncsnpp256_config)}


def matmul_flops_per_second(device, size, repeats, dtype=torch.float32):
  """Best FLOP/s of a (size x size) @ (size x size) matmul in ``dtype`` over ``repeats`` timed runs."""
  a = torch.randn(size, size, device=device, dtype=dtype)
  b = torch.randn(size, size, device=device, dtype=dtype)
  a @ b
  _, best = timed(device, lambda: a @ b, repeats)
  return 2 * size ** 3 / best


def benchmark(model, batch, steps, matmul_size, precision='fp32', channels_last=False, compile_model=False):
  name, get_config = MODELS[model]
  config = get_config()
  device = run_lib.select_device(config)
  config.training.batch_size = batch
  config.training.precision = precision
  config.training.channels_last = channels_last
  run_lib.configure_backends(config, device)
  torch.manual_seed(0)
  state = losses.build_training_state(config, device)
  module = torch.compile(state['model']) if compile_model else state['model']
  flow = losses.build_rectified_flow(config, module)
  params = list(state['model'].parameters())
  generator = torch.Generator(device).manual_seed(0)
  scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
  step_fn = losses.get_step_fn(config, losses.get_loss_fn(config, flow), params, state['optimizer'], state['ema'],
                               train=True, device=device, generator=generator, grad_scaler=scaler)
  size = config.data.image_size
  batch_data = torch.rand(batch, config.data.num_channels, size, size, device=device,
                          generator=torch.Generator(device).manual_seed(1)) * 2 - 1
  micro_batches = [Batch(None, batch_data, slice(None))]
  rss_before = peak_rss_bytes()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()

  started = time.perf_counter()
  if compile_model:  # FLOPs are counted on the eager module; compilation happens in the first step.
    step_fn(state, micro_batches)
  compile_seconds = time.perf_counter() - started
  with FlopCounterMode(display=False) as counter:
    step_fn(state, micro_batches)  # Warm-up step, also counts FLOPs.
  flops_per_step = counter.get_total_flops()
  times = [timed_call(device, lambda: step_fn(state, micro_batches))[1] for _ in range(steps)]
  step_seconds = sorted(times)[len(times) // 2]
  peak_memory = (torch.cuda.max_memory_allocated() if device.type == 'cuda'
                 else peak_rss_bytes() - rss_before)

  peak = matmul_flops_per_second(device, matmul_size, repeats=10)
  peak_bf16 = matmul_flops_per_second(device, matmul_size, repeats=10, dtype=torch.bfloat16)
  achieved = flops_per_step / step_seconds
  n_params = sum(p.numel() for p in params)
  option = f'{precision}{" channels_last" if channels_last else ""}{" compile" if compile_model else ""}'
  print(f'device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}')
  print(f'model: {name}, {n_params:,} parameters, batch {batch}, {option}')
  print(f'train step: median {step_seconds * 1000:.1f} ms over {steps} steps -> {batch / step_seconds:.2f} images/s')
  print(f'FLOPs per step: {flops_per_step / 1e9:.1f} GFLOP ({flops_per_step / batch / 1e9:.1f} GFLOP/image, '
        f'forward + backward)')
  print(f'peak memory of the step: {peak_memory / 2**30:.2f} GiB '
        f'({"CUDA max allocated" if device.type == "cuda" else "growth of peak RSS"})')
  print(f'matmul peak ({matmul_size}^3): fp32 {peak / 1e12:.3f} TFLOP/s, bf16 {peak_bf16 / 1e12:.3f} TFLOP/s')
  print(f'train step achieves {achieved / 1e12:.3f} TFLOP/s = {achieved / peak:.1%} of the fp32 matmul peak, '
        f'{achieved / peak_bf16:.1%} of the bf16 one')
  print('RESULT ' + json.dumps({'option': option, 'images_per_second': batch / step_seconds,
                                'peak_memory_gib': peak_memory / 2**30, 'tflops': achieved / 1e12,
                                'fp32_peak_tflops': peak / 1e12, 'bf16_peak_tflops': peak_bf16 / 1e12,
                                'compile_seconds': compile_seconds}), flush=True)


OPTIONS = (('fp32', []), ('fp32 channels_last', ['--channels-last']), ('bf16', ['--precision', 'bf16']),
           ('bf16 channels_last', ['--precision', 'bf16', '--channels-last']), ('fp16', ['--precision', 'fp16']),
           ('fp32 compile', ['--compile']), ('bf16 channels_last compile', ['--precision', 'bf16', '--channels-last',
                                                                            '--compile']))


def compare_options(batch, steps, matmul_size, skip_compile):
  """Each option in its own process; images/s as a ratio to fp32 eager measured first in the same run."""
  results = []
  for label, flags in OPTIONS:
    if skip_compile and '--compile' in flags:
      continue
    if 'fp16' in flags and not torch.cuda.is_available():
      print(f'--- {label}: skipped on the CPU (no native fp16 arithmetic here; one step took over 5 minutes)')
      continue
    print(f'--- {label}', flush=True)
    output = subprocess.run([sys.executable, os.path.abspath(__file__), '--model', 'ddpmpp', '--batch', str(batch),
                             '--steps', str(steps), '--matmul-size', str(matmul_size), *flags],
                            check=True, capture_output=True, text=True).stdout
    print(output, end='', flush=True)
    results.append(json.loads(next(line for line in output.splitlines() if line.startswith('RESULT '))[7:]))
  baseline = results[0]
  print(f'\nCIFAR-10 DDPM++ train step, batch {batch}, {steps} timed steps; baseline: fp32 eager')
  print(f'{"option":<28}{"images/s":>10}{"x fp32":>8}{"peak GiB":>10}{"TFLOP/s":>9}')
  for result in results:
    print(f'{result["option"]:<28}{result["images_per_second"]:>10.2f}'
          f'{result["images_per_second"] / baseline["images_per_second"]:>8.2f}{result["peak_memory_gib"]:>10.2f}'
          f'{result["tflops"]:>9.3f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', choices=sorted(MODELS), default='ddpmpp')
  parser.add_argument('--batch', type=int, default=8, help='images per train step')
  parser.add_argument('--steps', type=int, default=5, help='timed steps (after one warm-up step)')
  parser.add_argument('--matmul-size', type=int, default=2048, help='side of the square matmul for the peak')
  parser.add_argument('--all', action='store_true', help='DDPM++ batch 8, NCSN++ 256 batch 1 and 2, one process each')
  parser.add_argument('--precision', choices=sorted(PRECISIONS), default='fp32')
  parser.add_argument('--channels-last', action='store_true', help='NHWC network and inputs')
  parser.add_argument('--compile', action='store_true', help='torch.compile the network')
  parser.add_argument('--options', action='store_true', help='every speed option against fp32 eager (DDPM++)')
  parser.add_argument('--skip-compile', action='store_true', help='with --options: leave out torch.compile')
  args = parser.parse_args()
  if args.options:
    compare_options(args.batch, args.steps, args.matmul_size, args.skip_compile)
    return
  if args.all:
    for model, batch, steps in (('ddpmpp', 8, args.steps), ('ncsnpp256', 1, 3), ('ncsnpp256', 2, 3)):
      print(f'--- {model}, batch {batch}', flush=True)
      subprocess.run([sys.executable, os.path.abspath(__file__), '--model', model, '--batch', str(batch),
                      '--steps', str(steps), '--matmul-size', str(args.matmul_size)], check=True)
    return
  benchmark(args.model, args.batch, args.steps, args.matmul_size, args.precision, args.channels_last, args.compile)


if __name__ == '__main__':
  main()
