"""Sampler speed and precision options, against the published scipy RK45 and with the full DDPM++ forward.

1. Samplers: Euler-1, Euler-N and the adaptive RK45 run through ``sampling.get_sampling_fn`` (the sampler of
   ``--mode eval`` and of pair generation) with each option: the network in fp32 or under bf16 autocast
   (``sampling.precision``), the solver state in float32 or float64 (``sampling.ode_state_dtype``), and on CUDA
   the network call eager or replayed from a CUDA graph (``sampling.cuda_graph``). For each: NFE (calls made, and
   in brackets those that shaped x1), seconds, images/s, speed over the baseline (fp32 network, float32 state,
   eager: the sampler before these options) measured in the same run, and the largest |x1 - x1 of the baseline|.
   The same RK45 problem (model, noise, tolerance, t from eps to 1) is then solved by the published driver,
   ``scipy.integrate.solve_ivp(method='RK45')`` on the batch flattened into one float64 numpy vector, calling the
   fp32 model at every evaluation.
2. The full-size CIFAR-10 DDPM++ forward alone at ``--forward-batch`` (default 1024 on CUDA), fp32 and bf16
   autocast, in NCHW and channels_last: seconds per call, images/s and the ratio to fp32.
3. With ``--fd-checkpoint`` (a checkpoint of the digits demo, ``--model digits``): the Frechet distance of RK45
   samples to the real digits for each option, in the features of the digit classifier of
   examples/digits_reflow_report.py, i.e. the effect of bf16 and of the state dtype on sample quality.

Weights are random unless --checkpoint names a checkpoint (its EMA weights are used). DDPM++ initialises the last
layer of every block near zero (model.init_scale = 0), so an untrained field is almost constant and easy for RK45;
--init-scale 1 initialises those layers like the others, a harder field. On CUDA, fp32 convolutions use TF32 (cuDNN's
default in PyTorch); the flags are printed.

  python benchmarks/sampling_speed.py --quick --init-scale 1   # CPU: batch 2, Euler-1, Euler-10, RK45 at tol 1e-3
  python benchmarks/sampling_speed.py --model digits --init-scale 1 --tol 1e-3  # CUDA: batch 1024, launch-bound
  python benchmarks/sampling_speed.py --model digits --checkpoint logs/digits_demo/checkpoints/checkpoint_3.pth \\
      --fd-checkpoint logs/digits_demo/checkpoints/checkpoint_3.pth --skip-samplers --skip-forward
"""
import argparse
import os
import sys

import numpy as np
import torch
from scipy import integrate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import sampling  # noqa: E402
from benchmarks.timing import timed  # noqa: E402
from configs.rectified_flow import cifar10_rf_gaussian_ddpmpp, digits_rf_gaussian_ddpmpp_demo  # noqa: E402

MODELS = {'cifar10': cifar10_rf_gaussian_ddpmpp.get_config, 'digits': digits_rf_gaussian_ddpmpp_demo.get_config}
# (sampling.precision, sampling.ode_state_dtype); the first is the baseline.
PRECISION_OPTIONS = (('fp32', 'float32'), ('bf16', 'float32'), ('fp32', 'float64'), ('bf16', 'float64'))


def build_network(config, checkpoint, device):
  net = models.create_model(config)
  if checkpoint:
    state = checkpoints.read_checkpoint(checkpoint)
    checkpoints.load_network_weights(net, state['model'], source=checkpoint)
    ema = models.ExponentialMovingAverage(net.parameters(), decay=config.model.ema_rate)
    ema.load_state_dict(state['ema'])
    ema.copy_to(net.parameters())
  return net.to(device).eval()


@torch.no_grad()
def scipy_rk45(velocity, noise, eps, tol):
  """The published RK45 sampler: solve_ivp on the flattened batch as one float64 system. Returns (x1, nfev)."""
  shape, device = noise.shape, noise.device

  def ode_func(t, y):
    x = torch.from_numpy(y.reshape(shape)).to(device=device, dtype=torch.float32)
    v = velocity(x, torch.full((shape[0],), float(t), device=device, dtype=torch.float32))
    return v.cpu().numpy().reshape(-1).astype(np.float64)

  solution = integrate.solve_ivp(ode_func, (eps, 1.0), noise.cpu().numpy().reshape(-1).astype(np.float64),
                                 rtol=tol, atol=tol, method='RK45')
  if not solution.success:
    raise RuntimeError(f'solve_ivp failed: {solution.message}')
  return torch.from_numpy(solution.y[:, -1].reshape(shape)).to(device=device, dtype=torch.float32), solution.nfev


def network_call(config, net, precision, channels_last):
  """(velocity, flow): the samplers' network call (``sampling.network_velocity``) of ``net`` in ``precision``, the
  network and its inputs NCHW or channels_last (converts ``net`` in place, sets ``config.training.channels_last``)."""
  net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
  config.training.channels_last = channels_last
  flow = losses.build_rectified_flow(config, net)
  return sampling.network_velocity(flow, precision), flow


@torch.no_grad()
def time_network_call(device, velocity, x, t, repeats, warmup=1):
  """(velocity(x, t), the least seconds of ``repeats`` calls) with autograd off, after ``warmup`` untimed calls
  (cuDNN's first choices, a CUDA graph's capture). CUDA's peak memory statistics are reset after the warm-up, so
  that ``torch.cuda.max_memory_allocated`` afterwards covers the timed calls only."""
  timed(device, lambda: velocity(x, t), warmup)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  return timed(device, lambda: velocity(x, t), repeats)


def time_sampler(device, sample_fn, flow, noise, repeats):
  """(solution, the least seconds of ``repeats`` solves) of ``sample_fn(flow, noise=noise)``; on CUDA after one
  untimed solve, so that cuDNN's autotuning and the capture of CUDA graphs stay out of the timing."""
  if device.type == 'cuda':
    sample_fn(flow, noise=noise)
  return timed(device, lambda: sample_fn(flow, noise=noise), repeats)


def sampler_options(device):
  """(precision, ode_state_dtype, cuda_graph) to time: every precision option, eager and, on CUDA, graphed."""
  graphs = (False, True) if device.type == 'cuda' else (False,)
  return [(precision, state, graph) for graph in graphs for precision, state in PRECISION_OPTIONS]


def option_name(precision, state, graph, device):
  return f'{precision} net, {state} state' + (', graph' if graph else ', eager' if device.type == 'cuda' else '')


def configured(config, sampler, precision, state, graph, steps=None):
  config = config.copy_and_resolve_references()
  config.sampling.use_ode_sampler = sampler
  config.sampling.sample_N = steps or config.sampling.sample_N
  config.sampling.precision, config.sampling.ode_state_dtype, config.sampling.cuda_graph = precision, state, graph
  return config


def print_row(name, nfe, seconds, batch, baseline_seconds, difference):
  print(f'{name:<44} {nfe:>11} {seconds:>9.3f} {batch / seconds:>10.1f} {baseline_seconds / seconds:>8.2f} '
        f'{difference:>12.3g}')


def time_samplers(config, flow, noise, args, device):
  """Table 1: every sampler with every option, and scipy's RK45."""
  eps = config.training.time_eps
  print(f'{"sampler / option":<44} {"NFE":>11} {"seconds":>9} {"images/s":>10} {"x base":>8} {"max|dx1|":>12}'
        f'  (least of {args.repeats}; x base: speed over the baseline, the first row of each sampler)')
  for sampler, steps in (('euler', 1), ('euler', args.euler_steps), ('rk45', None)):
    label = f'euler-{steps}' if sampler == 'euler' else f'rk45 tol {args.tol:g}'
    baseline_seconds = baseline_x1 = None
    fastest = (float('inf'), None)
    for precision, state, graph in sampler_options(device):
      sample_fn = sampling.get_sampling_fn(configured(config, sampler, precision, state, graph, steps), noise.shape)
      solution, seconds = time_sampler(device, sample_fn, flow, noise, args.repeats)
      if baseline_seconds is None:
        baseline_seconds, baseline_x1 = seconds, solution.x
      nfe = (str(solution.nfe) if solution.nfe == solution.contributing_nfe else
             f'{solution.nfe} ({solution.contributing_nfe})')
      difference = (solution.x - baseline_x1).abs().max().item()
      print_row(f'{label}: {option_name(precision, state, graph, device)}', nfe, seconds, noise.shape[0],
                baseline_seconds, difference)
      fastest = min(fastest, (seconds / solution.nfe, option_name(precision, state, graph, device)))
    if sampler != 'rk45':
      continue
    (scipy_x1, scipy_nfe), scipy_seconds = timed(device, lambda: scipy_rk45(flow.velocity, noise, eps, args.tol),
                                                 args.repeats)
    print_row(f'{label}: scipy solve_ivp (published)', str(scipy_nfe), scipy_seconds, noise.shape[0],
              baseline_seconds, (scipy_x1 - baseline_x1).abs().max().item())
    print(f'per NFE: scipy {scipy_seconds / scipy_nfe * 1e3:.2f} ms; fastest torch option ({fastest[1]}) '
          f'{fastest[0] * 1e3:.2f} ms, {scipy_seconds / scipy_nfe / fastest[0]:.2f}x faster than scipy')


def time_forward(args, device):
  """Table 2: the full-size CIFAR-10 DDPM++ forward, fp32 against bf16 autocast, NCHW and channels_last."""
  config = cifar10_rf_gaussian_ddpmpp.get_config()
  config.model.init_scale = args.init_scale
  torch.manual_seed(args.seed)
  net = build_network(config, '', device)
  x = torch.randn(args.forward_batch, config.data.num_channels, config.data.image_size, config.data.image_size,
                  device=device)
  t = torch.rand(args.forward_batch, device=device)
  print(f'\nfull CIFAR-10 DDPM++ forward ({sum(p.numel() for p in net.parameters()):,} parameters), batch '
        f'{args.forward_batch}, eager, least of {args.forward_repeats} after a warm-up call')
  print(f'{"network":<28} {"seconds":>9} {"images/s":>10} {"x fp32":>8} {"max|dv|/max|v|":>15}')
  baseline_seconds = baseline_v = None
  for channels_last in (False, True):
    for precision in ('fp32', 'bf16'):
      velocity, _ = network_call(config, net, precision, channels_last)
      v, seconds = time_network_call(device, velocity, x, t, args.forward_repeats)
      if baseline_seconds is None:
        baseline_seconds, baseline_v = seconds, v
      name = precision + (' channels_last' if channels_last else '')
      relative = ((v - baseline_v).abs().max() / baseline_v.abs().max()).item()
      print(f'{name:<28} {seconds:>9.4f} {args.forward_batch / seconds:>10.1f} {baseline_seconds / seconds:>8.2f} '
            f'{relative:>15.3g}')


def frechet_distances(config, flow, args, device):
  """Table 3: FD of RK45 samples to the real digits for every option (digit classifier features)."""
  from examples.digits_reflow_report import frechet, train_classifier

  classifier, accuracy, real = train_classifier()
  noise = torch.randn(noise_shape(config, args.fd_num), generator=torch.Generator().manual_seed(args.seed)).to(device)
  print(f'\nFD of {args.fd_num} RK45 samples (tol {args.tol:g}) to the {len(real)} real digits, 64-d features of '
        f'the digit classifier (held-out accuracy {accuracy:.3f}); the same noises for every option')
  print(f'{"option":<36} {"NFE":>11} {"FD":>8} {"max|dx1|":>10}')
  baseline_x1 = None
  for precision, state, graph in sampler_options(device):
    sample_fn = sampling.get_sampling_fn(configured(config, 'rk45', precision, state, graph), noise.shape)
    solution = sample_fn(flow, noise=noise)
    baseline_x1 = solution.x if baseline_x1 is None else baseline_x1
    distance = frechet(classifier, solution.x.clamp(-1, 1).float().cpu(), real)
    print(f'{option_name(precision, state, graph, device):<36} {solution.contributing_nfe:>11} {distance:>8.3f} '
          f'{(solution.x - baseline_x1).abs().max().item():>10.3g}')


def noise_shape(config, batch):
  return (batch, config.data.num_channels, config.data.image_size, config.data.image_size)


def benchmark(args):
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  config = MODELS[args.model]()
  config.model.init_scale = args.init_scale
  config.sampling.ode_tol = args.tol
  config.sampling.rk45_sync_every = args.rk45_sync_every
  torch.manual_seed(args.seed)
  net = build_network(config, args.checkpoint, device)
  flow = losses.build_rectified_flow(config, net)
  print(f'device: {torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, threads: '
        f'{torch.get_num_threads()}, torch {torch.__version__}')
  if device.type == 'cuda':
    print(f'TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}; '
          f'cudnn.benchmark {torch.backends.cudnn.benchmark}')
  if not args.skip_samplers:
    noise = flow.sample_noise(noise_shape(config, args.batch), device=device)
    weights = args.checkpoint or f'random weights (model.init_scale {args.init_scale:g}, seed {args.seed})'
    print(f'model: {args.model} DDPM++ {config.data.image_size}x{config.data.image_size}, '
          f'{sum(p.numel() for p in net.parameters()):,} parameters, batch {args.batch}, {weights}, '
          f'rk45_sync_every {args.rk45_sync_every} (0: 4 on CUDA, 1 on the CPU)')
    with torch.no_grad():
      timed(device, lambda: flow.velocity(noise, torch.full((args.batch,), 0.5, device=device)))  # Warm-up.
    time_samplers(config, flow, noise, args, device)
  if not args.skip_forward:
    time_forward(args, device)
  if args.fd_checkpoint:
    if args.model != 'digits':
      raise ValueError('--fd-checkpoint needs --model digits (the FD uses a digit classifier)')
    fd_net = build_network(config, args.fd_checkpoint, device)
    frechet_distances(config, losses.build_rectified_flow(config, fd_net), args, device)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='cifar10', choices=list(MODELS),
                      help='cifar10: the full DDPM++ 32x32 (61.8M); digits: the demo DDPM++ 16x16 (1.3M)')
  parser.add_argument('--batch', type=int, default=None, help='images per sampler call (default: 4 on the CPU, '
                      '--quick 2; 1024 on CUDA)')
  parser.add_argument('--euler-steps', type=int, default=None, help='N of Euler-N (default 100, --quick 10)')
  parser.add_argument('--tol', type=float, default=None, help='rtol = atol of both RK45 (default 1e-5, --quick 1e-3)')
  parser.add_argument('--rk45-sync-every', type=int, default=0, help='sampling.rk45_sync_every of the torch RK45')
  parser.add_argument('--checkpoint', default='', help='checkpoint whose EMA weights to use (default: random)')
  parser.add_argument('--init-scale', type=float, default=0.0, help='model.init_scale of the random weights')
  parser.add_argument('--seed', type=int, default=0, help='seeds the random weights and the noise')
  parser.add_argument('--repeats', type=int, default=1, help='times each sampler runs; the least time is printed')
  parser.add_argument('--forward-batch', type=int, default=None, help='batch of the full DDPM++ forward timing '
                      '(default: 1024 on CUDA, 4 on the CPU, --quick 2)')
  parser.add_argument('--forward-repeats', type=int, default=None, help='timed forward calls (default: 10 on CUDA, '
                      '2 on the CPU)')
  parser.add_argument('--fd-checkpoint', default='', help='digits demo checkpoint: FD of its RK45 samples per option')
  parser.add_argument('--fd-num', type=int, default=1000, help='samples for the FD')
  parser.add_argument('--skip-samplers', action='store_true', help='leave out table 1 (samplers)')
  parser.add_argument('--skip-forward', action='store_true', help='leave out table 2 (full DDPM++ forward)')
  parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (default 0: torch\'s choice); 1 is '
                      'steadier on a CPU shared with other jobs')
  parser.add_argument('--quick', action='store_true', help='defaults for a run of a few minutes on 2 CPU cores')
  args = parser.parse_args()
  cuda = torch.cuda.is_available()
  defaults = {'batch': 1024 if cuda else 2 if args.quick else 4, 'euler_steps': 10 if args.quick else 100,
              'tol': 1e-3 if args.quick else 1e-5, 'forward_batch': 1024 if cuda else 2 if args.quick else 4,
              'forward_repeats': 10 if cuda else 2}
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.threads:
    torch.set_num_threads(args.threads)
  benchmark(args)


if __name__ == '__main__':
  main()
