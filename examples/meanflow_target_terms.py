"""What MeanFlow's target is made of, through training: the sizes of its terms on the digits DDPM++.

MeanFlow regresses u_theta(z_t, t, s) on sg(v + (s - t) d/dt u_theta), the total derivative being the network's
change through its image input along the flow, (du/dz) v, plus its change through its time input, du/dt.
``MeanFlow.target_terms`` gives each part; this script trains a MeanFlow of the digits (the one-step bench's
network, data and settings) for each time scale asked (``model.time_scale = model.interval_scale``: 999 the
published rectified flow's, 1 MeanFlow's official raw times), keeps a checkpoint every ``--every`` updates, and
prints, for the initial network and each checkpoint, the root-mean-square per pixel over a fixed batch of interval
samples (s > t, the run's time sampler) of:

  u          the prediction u_theta(z_t, t, s)
  v          the conditional velocity X1 - X0
  spatial    (s - t) (du/dz) v
  temporal   (s - t) du/dt
  target-u   the regression's residual

A time input on the scale of 999 makes du/dt large at initialisation (the sinusoidal embedding of t * 999 turns
fast), so the target is then mostly the network's own time derivative rather than the data.

  python examples/meanflow_target_terms.py --workdir logs/meanflow_terms                 # 999 and 1, 600 updates
  python examples/meanflow_target_terms.py --workdir W --scales 1 --updates 2000 --every 500
"""
import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import evaluation_digits  # noqa: E402
import losses  # noqa: E402
import run_lib  # noqa: E402
from configs.rectified_flow.cifar10_meanflow import set_meanflow  # noqa: E402
from examples import one_step_bench  # noqa: E402
from rectified_flow_pytorch import flow_math  # noqa: E402

TERMS = ('u', 'v', 'spatial', 'temporal', 'target-u')


def run_config(args, scale):
  """The bench's MeanFlow route (``--meanflow-settings``, ``--set``) with both time inputs on ``scale``."""
  bench_args = argparse.Namespace(model='ddpmpp', small=args.small, batch=args.batch, set=args.set)
  config = set_meanflow(one_step_bench.base_config(bench_args, args.seed, args.updates),
                        **one_step_bench.MEANFLOW_SETTINGS[args.meanflow_settings])
  config.model.time_scale = config.model.interval_scale = float(scale)
  config.training.snapshot_freq = args.every
  config.sampling.sample_steps = ()
  return config


def measurement_batch(config, flow, size, seed):
  """A fixed batch of digits on the path at interval (t, s) pairs of the run's time sampler."""
  generator = torch.Generator().manual_seed(seed)
  images = evaluation_digits.real_digits()[0]  # In [-1, 1], as the training data.
  data = images[torch.randperm(len(images), generator=generator)[:size]]
  noise = torch.randn(data.shape, generator=generator) * flow.noise_std
  flow.interval_fraction = 1.0  # Every sample an interval: the samples whose target has a derivative.
  times, end_times = flow.sample_time_pairs(size, generator=generator)
  return flow_math.interpolate(noise, data, times), times, end_times, flow_math.velocity_target(noise, data)


def sizes(config, state, batch):
  """The RMS per pixel of each term (``TERMS``) of ``state``'s raw network on ``batch``."""
  net = state['model'].eval()
  flow = losses.build_flow(config, net)
  terms = flow.target_terms(*batch)
  target = terms['velocity'] + terms['spatial'] + terms['temporal']
  parts = {'u': terms['prediction'], 'v': terms['velocity'], 'spatial': terms['spatial'],
           'temporal': terms['temporal'], 'target-u': target - terms['prediction']}
  return {name: float(value.square().mean().sqrt()) for name, value in parts.items()}


def measure(config, workdir, size, seed):
  """[(step, sizes)] for the initial network (seeded as the run) and each snapshot under ``workdir``."""
  device = torch.device('cpu')
  torch.manual_seed(config.seed)
  state = losses.build_training_state(config, device)
  batch = measurement_batch(config, losses.build_flow(config, state['model']), size, seed)
  rows = [(0, sizes(config, state, batch))]
  paths = glob.glob(os.path.join(checkpoints.checkpoint_dir(workdir), 'checkpoint_*.pth'))
  for path in sorted(paths, key=lambda p: int(os.path.basename(p)[len('checkpoint_'):-len('.pth')])):
    state = losses.build_training_state(config, device)
    loaded = checkpoints.load_checkpoint(path, state, device=device, load_optimizer=False, config=config)
    rows.append((int(loaded['step']), sizes(config, state, batch)))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='logs/meanflow_terms')
  parser.add_argument('--scales', type=float, nargs='+', default=[999.0, 1.0],
                      help='time scales to compare (model.time_scale = model.interval_scale)')
  parser.add_argument('--updates', type=int, default=600)
  parser.add_argument('--every', type=int, default=100, help='updates between measured checkpoints')
  parser.add_argument('--batch', type=int, default=64, help='the training batch (the bench: 64)')
  parser.add_argument('--measure', type=int, default=256, help='interval samples in the measured batch')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--small', action='store_true', help="the bench's smaller network (a quick look)")
  parser.add_argument('--meanflow-settings', choices=sorted(one_step_bench.MEANFLOW_SETTINGS), default='cifar10')
  parser.add_argument('--set', type=one_step_bench.key_value, nargs='+', action='extend', default=[],
                      metavar='KEY=VALUE', help='config keys of the runs, as the bench takes them')
  args = parser.parse_args(argv)
  results = {}
  for scale in args.scales:
    config = run_config(args, scale)
    workdir = os.path.join(args.workdir, f'scale_{scale:g}')
    run_lib.train(config, workdir)
    results[f'{scale:g}'] = measure(config, workdir, args.measure, args.seed + 1)
  lines = ['| time scale | update | ' + ' | '.join(TERMS) + ' |', '|---' * (len(TERMS) + 2) + '|']
  for scale, rows in results.items():
    for step, values in rows:
      lines.append(f'| {scale} | {step} | ' + ' | '.join(f'{values[name]:.3g}' for name in TERMS) + ' |')
  text = '\n'.join(lines)
  print(text)
  with open(os.path.join(args.workdir, 'target_terms.md'), 'w') as handle:
    handle.write(text + '\n')
  with open(os.path.join(args.workdir, 'target_terms.json'), 'w') as handle:
    json.dump(results, handle, indent=1)
  return results


if __name__ == '__main__':
  main()
