"""Images/s and peak memory of a full-size train step, against this machine's own fp32 and bf16 matmul FLOP/s.

One step is what ``--mode train`` runs: forward, backward, gradient clipping, Adam and the EMA update
(``losses.get_step_fn``). FLOPs per step are counted with ``torch.utils.flop_counter``; the peak is the best
FLOP/s of a square fp32 matmul measured in the same run. Peak memory is the growth of the process's peak RSS
during the step (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA); each configuration runs in its own process.

  python benchmarks/train_step.py                           # CIFAR-10 DDPM++ at batch 8
  python benchmarks/train_step.py --model ncsnpp256 --batch 1
  python benchmarks/train_step.py --all                     # both models: DDPM++ batch 8, NCSN++ 256 batch 1 and 2
  python benchmarks/train_step.py --options                 # DDPM++ batch 8: each speed option against fp32 eager
  python benchmarks/train_step.py --transformers --batch 8  # DDPM++ and the DiTs at one batch, against DDPM++
  python benchmarks/train_step.py --model dit_b2_latent --batch 256 --precision bf16 --matmul-size 8192  # a GPU

``--options`` runs plain fp32 eager first (the baseline, in the same run) and then bf16, bf16 + channels_last,
fp16 (grad scaler), channels_last alone and torch.compile variants, each in its own process, and prints
images/s as a ratio to the baseline and peak memory. Whether an option trains the same model is the business of
``benchmarks/precision_curve.py`` (loss curves over hundreds of updates); a few steps of a freshly initialised
DDPM++ (zero-initialised output layer, learning rate still warming up) cannot tell.

``--transformers`` runs the CIFAR-10 DDPM++ (the baseline, in the same run), the CIFAR-10 DiT of U-ViT-S/2's size
(configs/rectified_flow/cifar10_dit.py, as many parameters) and the class-conditional DiT-B/2 on the 4 x 32 x 32
latents of 256 x 256 ImageNet (configs/rectified_flow/imagenet256_latent_dit_b2.py; the step on latents as the cache
gives them, so no autoencoder runs), each in its own process at ``--batch`` and ``--precision``, and prints GFLOP per
image, images/s as a ratio to DDPM++, and the fraction of the bf16 matmul peak each step reaches (issue 24's target
for DiT-B/2 at batch 256 in bf16 on a GPU: 40%; the peak is measured at ``--matmul-size``, which on a GPU wants 8192).
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
import models  # noqa: E402
import run_lib  # noqa: E402
from benchmarks.timing import count_cpu_attention_flops, peak_rss_bytes, timed, timed_call  # noqa: E402
from configs.rectified_flow.celeba_hq_pytorch_rf_gaussian import get_config as ncsnpp256_config  # noqa: E402
from configs.rectified_flow.cifar10_dit import get_config as cifar10_dit_config  # noqa: E402
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as ddpmpp_config  # noqa: E402
from configs.rectified_flow.digits_dit_demo import get_config as digits_dit_config  # noqa: E402
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config  # noqa: E402
from configs.rectified_flow.imagenet256_latent_dit_b2 import get_config as imagenet_dit_b2_config  # noqa: E402
from datasets import Batch  # noqa: E402
from speed.precision import PRECISIONS  # noqa: E402


def latent_dit_b2_config():
  """imagenet256_latent_dit_b2.py's flow and network on latents as its cache gives them: 4 x 32 x 32, the 1000
  classes; without the autoencoder, which the train step does not call."""
  config = imagenet_dit_b2_config()
  config.latent.autoencoder = ''
  config.data.dataset, config.data.image_size, config.data.num_channels, config.data.centered = 'LATENTS', 32, 4, True
  return config


MODELS = {'ddpmpp': ('CIFAR-10 DDPM++ 32x32', ddpmpp_config),
          'ncsnpp256': ('CelebA-HQ NCSN++ 256x256', ncsnpp256_config),
          'dit_cifar10': ('CIFAR-10 DiT 13x512/2 (U-ViT-S/2 size) 32x32', cifar10_dit_config),
          'dit_b2_latent': ('DiT-B/2 on ImageNet-256 latents 4x32x32, 1000 classes', latent_dit_b2_config),
          'digits': ('digits demo DDPM++ 16x16', digits_config),
          'digits_dit': ('digits demo DiT 4x128/2 16x16', digits_dit_config)}
TRANSFORMER_MODELS = ('ddpmpp', 'dit_cifar10', 'dit_b2_latent')


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
  data_generator = torch.Generator(device).manual_seed(1)
  batch_data = torch.rand(batch, *models.flow_shape(config), device=device, generator=data_generator) * 2 - 1
  classes = models.num_classes(config)
  labels = (torch.randint(0, classes, (batch,), device=device, generator=data_generator) if classes else None)
  micro_batches = [Batch(None, batch_data, slice(None), labels)]
  rss_before = peak_rss_bytes()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()

  started = time.perf_counter()
  if compile_model:  # FLOPs are counted on the eager module; compilation happens in the first step.
    step_fn(state, micro_batches)
  compile_seconds = time.perf_counter() - started
  count_cpu_attention_flops()
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
  print('RESULT ' + json.dumps({'model': model, 'option': option, 'batch': batch, 'parameters': n_params,
                                'images_per_second': batch / step_seconds, 'peak_memory_gib': peak_memory / 2**30,
                                'gflop_per_image': flops_per_step / batch / 1e9, 'tflops': achieved / 1e12,
                                'fp32_peak_tflops': peak / 1e12, 'bf16_peak_tflops': peak_bf16 / 1e12,
                                'bf16_peak_fraction': achieved / peak_bf16, 'compile_seconds': compile_seconds}),
        flush=True)


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
    results.append(result_of(output))
  baseline = results[0]
  print(f'\nCIFAR-10 DDPM++ train step, batch {batch}, {steps} timed steps; baseline: fp32 eager')
  print(f'{"option":<28}{"images/s":>10}{"x fp32":>8}{"peak GiB":>10}{"TFLOP/s":>9}')
  for result in results:
    print(f'{result["option"]:<28}{result["images_per_second"]:>10.2f}'
          f'{result["images_per_second"] / baseline["images_per_second"]:>8.2f}{result["peak_memory_gib"]:>10.2f}'
          f'{result["tflops"]:>9.3f}')


def result_of(output):
  return json.loads(next(line for line in output.splitlines() if line.startswith('RESULT '))[7:])


def compare_transformers(batch, steps, matmul_size, precision, timeout=None):
  """The DDPM++ and the DiTs (``TRANSFORMER_MODELS``), each in its own process at one batch and precision: markdown
  lines of a table with images/s as a ratio to the DDPM++ step measured first in the same run. A model whose process
  fails or runs past ``timeout`` s gets a row that says so."""
  rows, baseline = [], None
  for model in TRANSFORMER_MODELS:
    command = [sys.executable, os.path.abspath(__file__), '--model', model, '--batch', str(batch), '--steps',
               str(steps), '--matmul-size', str(matmul_size), '--precision', precision]
    print(f'--- {model}', flush=True)
    try:
      completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      rows.append(f'| {MODELS[model][0]} | stopped: ran past {timeout:.0f} s | | | | | |')
      continue
    print(completed.stdout, end='', flush=True)
    if completed.returncode:
      tail = ' / '.join((completed.stdout + completed.stderr).strip().splitlines()[-3:])
      rows.append(f'| {MODELS[model][0]} | failed (exit status {completed.returncode}): {tail} | | | | | |')
      continue
    result = result_of(completed.stdout)
    baseline = baseline or (result if model == 'ddpmpp' else None)
    speed = f'{result["images_per_second"] / baseline["images_per_second"]:.2f}x' if baseline else 'n/a'
    rows.append(f'| {MODELS[model][0]} | {result["parameters"] / 1e6:.1f}M | {result["gflop_per_image"]:.1f} | '
                f'{result["images_per_second"]:.1f} | {speed} | {result["tflops"]:.2f} | '
                f'{result["bf16_peak_fraction"]:.1%} |')
  return [f'Train step, batch {batch}, {precision}, median of {steps} timed steps; baseline: the DDPM++ step', '',
          '| model | parameters | GFLOP/image (fwd + bwd) | images/s | x DDPM++ | TFLOP/s | of the bf16 matmul peak |',
          '|---|---|---|---|---|---|---|'] + rows


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
  parser.add_argument('--transformers', action='store_true', help='DDPM++ and the DiTs at --batch and --precision')
  args = parser.parse_args()
  if args.transformers:
    print('\n'.join(compare_transformers(args.batch, args.steps, args.matmul_size, args.precision)))
    return
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
