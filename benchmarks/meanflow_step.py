"""The MeanFlow, SplitMeanFlow and improved MeanFlow training steps' cost against the rectified-flow step on the
same network of two times.

Both objectives train the same DDPM++ built with ``model.time_inputs = 2`` and wrapped in ``VelocityField``, so
that the comparison is the objective's cost and not the network's:

  rectified flow  ``RectifiedFlow`` around the network called with end_times = times (an interval of length 0):
                  one forward, one backward;
  MeanFlow        ``MeanFlow`` (its defaults: 25% intervals, adaptive weight p = 1): one forward-mode pass of the
                  network with dual numbers along (v, 1, 0) (``torch.autograd.forward_ad``), which computes the
                  forward and its tangent together, and the backward of the forward's output;
  SplitMeanFlow   ``SplitMeanFlow`` (the same defaults, lam ~ U(0, 1)): two forwards without gradient (the network
                  on the two parts of each interval), then one forward and its backward: no forward mode;
  improved MeanFlow  ``ImprovedMeanFlow`` (the same defaults): one forward without gradient (the network's own
                  velocity u(z, t, t), the tangent), then MeanFlow's forward-mode pass and backward.

One step is forward + backward + Adam (``losses.get_optimizer``: the training's Adam, fused where available) on a
fixed random batch; no clipping, no EMA. Each objective runs in its own process (the CPU's peak RSS only grows),
rectified flow first: the baseline, measured in the same run. Reported: the median ms/step over ``--steps`` timed
steps after ``--warmup`` steps, images/s, the step's peak memory (CPU: growth of the process's peak RSS from before
the warm-up, as ``benchmarks/train_step.py``; CUDA: ``torch.cuda.max_memory_allocated``), and MeanFlow / rectified
flow; then the step in two parts, the loss (rectified flow: one forward; MeanFlow: the JVP; SplitMeanFlow: three
forwards; improved MeanFlow: a forward and the JVP) and backward + Adam,
each timed on its own. The fastest step is printed too: on a machine shared with other jobs it is the steadier
figure. Give the warm-up a few steps: forward-mode AD loads TorchScript decompositions on its first call, which run
slowly at first.

  python benchmarks/meanflow_step.py                                  # digits DDPM++ (1.3M) at batch 16, CPU
  python benchmarks/meanflow_step.py --threads 1 --steps 30           # on a CPU shared with other jobs
  python benchmarks/meanflow_step.py --model ddpmpp --batch 128 --device cuda
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import models  # noqa: E402
import run_lib  # noqa: E402
from benchmarks.timing import peak_rss_bytes, timed_call  # noqa: E402
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as ddpmpp_config  # noqa: E402
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config  # noqa: E402
from rectified_flow_pytorch import ImprovedMeanFlow, MeanFlow, RectifiedFlow, SplitMeanFlow  # noqa: E402

MODELS = {'digits': ('digits DDPM++ 16x16', digits_config), 'ddpmpp': ('CIFAR-10 DDPM++ 32x32', ddpmpp_config)}
OBJECTIVES = {'rf': 'rectified flow', 'meanflow': 'MeanFlow (JVP)', 'split': 'SplitMeanFlow (no JVP)',
              'imf': 'improved MeanFlow (JVP)'}
FLOWS = {'meanflow': MeanFlow, 'split': SplitMeanFlow, 'imf': ImprovedMeanFlow}


class ZeroInterval(nn.Module):
  """The two-time velocity field as a one-time one: v(x, t) = u(x, t, t), the call a rectified flow makes."""

  def __init__(self, field):
    super().__init__()
    self.field = field

  def forward(self, x, times, labels=None):
    return self.field(x, times, labels=labels, end_times=times)


def machine(device):
  """One line naming what the figures were measured on."""
  if device.type == 'cuda':
    where = torch.cuda.get_device_name(device)
  else:
    where = platform.processor() or platform.machine()
    try:
      with open('/proc/cpuinfo', encoding='utf-8') as f:
        where = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
      pass
    threads = torch.get_num_threads()
    where += f', {threads} thread{"s" if threads != 1 else ""} ({os.cpu_count()} CPUs visible)'
  return f'{device.type}: {where}, torch {torch.__version__}, Python {platform.python_version()}'


def build(model, device):
  """(config, the two-time network in a ``VelocityField``, on ``device``)."""
  config = MODELS[model][1]()
  config.model.time_inputs = 2
  run_lib.configure_backends(config, device)
  torch.manual_seed(0)
  return config, losses.velocity_field(config, models.create_model(config)).to(device)


def measure(model, objective, batch, steps, warmup, device, threads):
  """Times one objective's train step; returns its figures as a dict."""
  device = torch.device(device)
  if threads:
    torch.set_num_threads(threads)
  config, field = build(model, device)
  if objective == 'rf':
    flow = RectifiedFlow(ZeroInterval(field), noise_std=config.sampling.init_noise_scale,  # As build_rectified_flow.
                         time_eps=config.training.time_eps,
                         loss_reduction='mean' if config.training.reduce_mean else 'sum')
  else:
    flow = FLOWS[objective](field, noise_std=config.sampling.init_noise_scale)
  params = list(field.parameters())
  optimizer = losses.get_optimizer(config, params, device)
  size = config.data.image_size
  data = torch.rand(batch, config.data.num_channels, size, size, device=device,
                    generator=torch.Generator(device).manual_seed(1)) * 2 - 1
  torch.manual_seed(2)

  def update(loss):
    loss.backward()
    optimizer.step()

  def step():
    """(loss, seconds of the loss's forward, seconds of backward + Adam), each part timed as ``timed_call``."""
    optimizer.zero_grad(set_to_none=True)
    loss, forward_seconds = timed_call(device, lambda: flow(data))
    _, update_seconds = timed_call(device, lambda: update(loss))
    return loss.detach(), forward_seconds, update_seconds

  rss_before = peak_rss_bytes()
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  for _ in range(warmup):
    step()
  timings = [step() for _ in range(steps)]
  peak_memory = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
                 else peak_rss_bytes() - rss_before)
  times = sorted(forward + update for _, forward, update in timings)
  seconds = statistics.median(times)
  return {'objective': objective, 'ms_per_step': seconds * 1000, 'images_per_second': batch / seconds,
          'fastest_ms': times[0] * 1000, 'slowest_ms': times[-1] * 1000,
          'forward_ms': statistics.median(forward for _, forward, _ in timings) * 1000,
          'update_ms': statistics.median(update for _, _, update in timings) * 1000,
          'peak_memory_gib': peak_memory / 2**30, 'final_loss': float(timings[-1][0]),
          'parameters': sum(p.numel() for p in params), 'machine': machine(device)}


def compare(model, batch, steps, warmup, device, threads):
  """Each objective in its own process, rectified flow first; prints the markdown table."""
  results = []
  for objective in OBJECTIVES:
    print(f'--- {OBJECTIVES[objective]}', flush=True)
    run = subprocess.run([sys.executable, os.path.abspath(__file__), '--model', model, '--batch', str(batch),
                          '--steps', str(steps), '--warmup', str(warmup), '--device', device, '--threads', str(threads),
                          '--objective', objective],
                         capture_output=True, text=True)
    if run.returncode:
      sys.exit(f'{OBJECTIVES[objective]} failed (exit status {run.returncode}):\n{run.stdout}{run.stderr}')
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith('RESULT '))[7:])
    print(f'median {result["ms_per_step"]:.1f} ms/step (fastest {result["fastest_ms"]:.1f}, slowest '
          f'{result["slowest_ms"]:.1f}), loss after the last step {result["final_loss"]:.4g}', flush=True)
    results.append(result)
  baseline = results[0]
  memory = 'CUDA max allocated' if device.startswith('cuda') else 'growth of peak RSS'
  print(f'\nmachine: {baseline["machine"]}')
  print(f'model: {MODELS[model][0]}, model.time_inputs = 2, {baseline["parameters"]:,} parameters, batch {batch}, '
        f'fp32; median of {steps} steps after {warmup} warm-up steps; step = forward + backward + Adam\n')
  print(f'| objective | ms/step (median) | fastest ms/step | images/s (median) | peak memory ({memory}) | '
        f'x rectified flow (median) | x rectified flow (fastest) | memory x rectified flow |')
  print('|---|---|---|---|---|---|---|---|')
  for result in results:
    print(f'| {OBJECTIVES[result["objective"]]} | {result["ms_per_step"]:.1f} | {result["fastest_ms"]:.1f} | '
          f'{result["images_per_second"]:.1f} | {result["peak_memory_gib"] * 1024:.0f} MiB | '
          f'{result["ms_per_step"] / baseline["ms_per_step"]:.2f} | '
          f'{result["fastest_ms"] / baseline["fastest_ms"]:.2f} | '
          f'{result["peak_memory_gib"] / baseline["peak_memory_gib"]:.2f} |')
  print('\nThe step in two parts (medians; the loss: rectified flow one forward, MeanFlow the JVP, SplitMeanFlow '
        'three forwards, two without gradient, improved MeanFlow a forward without gradient and the JVP):\n')
  print('| objective | loss (forward) ms | x rectified flow | backward + Adam ms | x rectified flow |')
  print('|---|---|---|---|---|')
  for result in results:
    print(f'| {OBJECTIVES[result["objective"]]} | {result["forward_ms"]:.1f} | '
          f'{result["forward_ms"] / baseline["forward_ms"]:.2f} | {result["update_ms"]:.1f} | '
          f'{result["update_ms"] / baseline["update_ms"]:.2f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', choices=sorted(MODELS), default='digits',
                      help="'digits': the demo's DDPM++ (configs/rectified_flow/digits_rf_gaussian_ddpmpp_demo.py); "
                           "'ddpmpp': CIFAR-10's (configs/rectified_flow/cifar10_rf_gaussian_ddpmpp.py)")
  parser.add_argument('--batch', type=int, default=16, help='images per train step')
  parser.add_argument('--steps', type=int, default=10, help='timed steps (the median is reported)')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps first')
  parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:N')")
  parser.add_argument('--threads', type=int, default=0,
                      help="CPU threads (torch.set_num_threads); 0: torch's default. On a CPU shared with other jobs, "
                           '1 avoids the stalls of a parallel region waiting for a descheduled thread')
  parser.add_argument('--objective', choices=sorted(OBJECTIVES), default=None,
                      help='time this objective alone in this process and print its RESULT line (used internally)')
  args = parser.parse_args()
  if args.steps < 1 or args.warmup < 1:
    parser.error('--steps and --warmup must be at least 1')
  if args.device.startswith('cuda') and not torch.cuda.is_available():
    parser.error(f'--device {args.device}: CUDA is not available here')
  if args.objective is not None:
    print('RESULT ' + json.dumps(measure(args.model, args.objective, args.batch, args.steps, args.warmup,
                                         args.device, args.threads)), flush=True)
    return
  compare(args.model, args.batch, args.steps, args.warmup, args.device, args.threads)


if __name__ == '__main__':
  main()
