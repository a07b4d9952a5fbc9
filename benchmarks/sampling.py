"""Images/s of the samplers with the full-size CIFAR-10 DDPM++, and the torch RK45 against scipy's solve_ivp.

Euler with 1 and N steps and the adaptive RK45 run through ``sampling.get_sampling_fn``, the sampler of
``--mode eval``. The same RK45 problem (model, noise, tolerance, t from eps to 1) is then solved by the published
driver: ``scipy.integrate.solve_ivp(method='RK45')`` on the batch flattened into one float64 numpy vector, calling
the same torch model in float32 at every evaluation. Both RK45 times, NFEs and the largest |x1 difference| are
printed. Weights are random unless --checkpoint names a checkpoint (its EMA weights are used). DDPM++ initialises
the last layer of every block near zero (model.init_scale = 0), so an untrained field is almost constant and easy
for RK45; --init-scale 1 initialises those layers like the others, a harder field.

  python benchmarks/sampling.py                     # batch 4: Euler-1, Euler-100, RK45 at tol 1e-5
  python benchmarks/sampling.py --quick             # batch 2: Euler-1, Euler-10, RK45 at tol 1e-3
  python benchmarks/sampling.py --checkpoint workdir/checkpoints/checkpoint_13.pth --rk45-sync-every 4
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from scipy import integrate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import sampling  # noqa: E402
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config  # noqa: E402


def synchronize(device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def timed(device, fn, repeats=1):
  """(fn(), the least seconds over ``repeats`` calls), the device synchronised before and after each call."""
  best = float('inf')
  for _ in range(repeats):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    best = min(best, time.perf_counter() - start)
  return result, best


def build_network(config, checkpoint, device):
  net = models.create_model(config)
  if checkpoint:
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
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


def benchmark(args):
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  config = get_config()
  config.model.init_scale = args.init_scale
  config.sampling.ode_tol = args.tol
  config.sampling.rk45_sync_every = args.rk45_sync_every
  torch.manual_seed(args.seed)
  net = build_network(config, args.checkpoint, device)
  flow = losses.build_rectified_flow(config, net)
  shape = (args.batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  noise = flow.sample_noise(shape, device=device)
  eps = config.training.time_eps

  n_params = sum(p.numel() for p in net.parameters())
  weights = args.checkpoint or f'random weights (model.init_scale {args.init_scale:g}, seed {args.seed})'
  print(f'device: {device}, threads: {torch.get_num_threads()}, torch {torch.__version__}')
  print(f'model: CIFAR-10 DDPM++ 32x32, {n_params:,} parameters, batch {args.batch}, fp32 eager, {weights}')
  timed(device, lambda: flow.velocity(noise, torch.full((args.batch,), 0.5, device=device)))  # Warm-up.

  print(f'{"sampler":<40} {"NFE":>11} {"seconds":>9} {"images/s":>9}  (least of {args.repeats} runs)')
  for steps in (1, args.euler_steps):
    config.sampling.use_ode_sampler, config.sampling.sample_N = 'euler', steps
    sample_fn = sampling.get_sampling_fn(config, shape)
    (_, nfe), seconds = timed(device, lambda: sample_fn(flow, noise=noise), args.repeats)
    print(f'{f"euler-{steps}":<40} {nfe:>11} {seconds:>9.2f} {args.batch / seconds:>9.3f}')

  config.sampling.use_ode_sampler = 'rk45'
  sample_fn = sampling.get_sampling_fn(config, shape)
  torch_seconds = scipy_seconds = float('inf')
  for _ in range(args.repeats):  # Alternating, so that a change in the machine's load hits both alike.
    torch_solution, seconds = timed(device, lambda: sample_fn(flow, noise=noise))
    torch_seconds = min(torch_seconds, seconds)
    (scipy_x1, scipy_nfe), seconds = timed(device, lambda: scipy_rk45(flow.velocity, noise, eps, args.tol))
    scipy_seconds = min(scipy_seconds, seconds)
  name = f'rk45 torch (tol {args.tol:g}, sync_every {args.rk45_sync_every})'
  nfe = f'{torch_solution.nfe} ({torch_solution.contributing_nfe})'
  print(f'{name:<40} {nfe:>11} {torch_seconds:>9.2f} {args.batch / torch_seconds:>9.3f}')
  name = f'rk45 scipy solve_ivp (tol {args.tol:g})'
  print(f'{name:<40} {scipy_nfe:>11} {scipy_seconds:>9.2f} {args.batch / scipy_seconds:>9.3f}')
  print('NFE of torch RK45: calls made (calls that shaped x1); its state is float32, scipy\'s float64')
  print(f'torch / scipy RK45 time: {torch_seconds / scipy_seconds:.3f}; per NFE '
        f'{torch_seconds / torch_solution.nfe * 1000:.1f} vs {scipy_seconds / scipy_nfe * 1000:.1f} ms; '
        f'max |x1 torch - x1 scipy| = {(torch_solution.x - scipy_x1).abs().max().item():.3g}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=None, help='images per sampler call (default 4, --quick 2)')
  parser.add_argument('--euler-steps', type=int, default=None, help='N of Euler-N (default 100, --quick 10)')
  parser.add_argument('--tol', type=float, default=None, help='rtol = atol of both RK45 (default 1e-5, --quick 1e-3)')
  parser.add_argument('--rk45-sync-every', type=int, default=1, help='sampling.rk45_sync_every of the torch RK45')
  parser.add_argument('--checkpoint', default='', help='checkpoint whose EMA weights to use (default: random)')
  parser.add_argument('--init-scale', type=float, default=0.0, help='model.init_scale of the random weights')
  parser.add_argument('--seed', type=int, default=0, help='seeds the random weights and the noise')
  parser.add_argument('--repeats', type=int, default=1, help='times each sampler runs; the least time is printed')
  parser.add_argument('--quick', action='store_true', help='defaults for a run of a few minutes on 2 CPU cores')
  args = parser.parse_args()
  quick = {'batch': 2, 'euler_steps': 10, 'tol': 1e-3}
  full = {'batch': 4, 'euler_steps': 100, 'tol': 1e-5}
  for key, value in (quick if args.quick else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  benchmark(args)


if __name__ == '__main__':
  main()
