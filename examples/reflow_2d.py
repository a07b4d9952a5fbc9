"""Rectified flow and one reflow on a 2-D toy: N(0, I) -> a mixture of Gaussians.

Trains a 1-rectified flow, reflows it once into a 2-rectified flow, prints the straightness and one-step error
of both, and writes a PNG of their trajectories:

  python examples/reflow_2d.py --out logs/reflow_2d.png
"""
import argparse
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rectified_flow_pytorch import RectifiedFlow, Reflow, solvers


class TimeMLP(nn.Module):
  """v(x, t) for 2-D points: an MLP on [x, t]."""

  def __init__(self, dim=2, hidden=128):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                             nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

  def forward(self, x, times):
    return self.net(torch.cat([x, times[:, None]], dim=1))


def mixture_sample(n, generator=None, radius=4.0, modes=4, std=0.4):
  """n points from ``modes`` Gaussians of std ``std`` evenly spaced on a circle of ``radius``."""
  k = torch.randint(modes, (n,), generator=generator)
  angle = 2 * math.pi * k.float() / modes + math.pi / 4
  centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
  return centres + std * torch.randn(n, 2, generator=generator)


def train(loss_fn, params, steps, lr=2e-3):
  optimizer = torch.optim.Adam(params, lr=lr)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
  for _ in range(steps):
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    schedule.step()
  return loss.item()


@torch.no_grad()
def flow_statistics(rf, x0, ode_steps=100):
  """Straightness S = E_t ||(Z1 - Z0) - v(Z_t, t)||^2 along the flow, and the one-step error ||Z1_1step - Z1||^2."""
  z, velocities = x0, []
  for i in range(ode_steps):
    t = torch.full((x0.shape[0],), i / ode_steps)
    v = rf.velocity(z, t)
    velocities.append(v)
    z = z + v / ode_steps
  displacement = z - x0
  straightness = torch.stack([(v - displacement).square().sum(1) for v in velocities]).mean().item()
  one_step, _ = solvers.euler(rf.velocity, x0, steps=1)
  one_step_error = (one_step - z).square().sum(1).mean().item()
  return straightness, one_step_error, z, one_step


def energy_distance(x, y):
  """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (Szekely & Rizzo 2013): zero iff the distributions agree."""
  return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def run(train_steps=3000, reflow_steps=3000, batch_size=512, seed=0, teacher_steps=100):
  """Trains the 1-RF and the 2-RF; returns {name: (flow, straightness, one-step error, one-step energy distance)}."""
  torch.manual_seed(seed)
  rectified_flow = RectifiedFlow(TimeMLP(), time_eps=0.0)
  train(lambda: rectified_flow(mixture_sample(batch_size)), rectified_flow.parameters(), train_steps)
  # Freezes a copy of the 1-rectified flow as the teacher; the flow itself goes on training as the student.
  reflow = Reflow(rectified_flow, batch_size=batch_size, teacher_solver='euler', teacher_steps=teacher_steps)
  train(reflow, reflow.model.parameters(), reflow_steps, lr=1e-3)
  rf1, rf2 = reflow.frozen_model, reflow.model

  x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(seed + 1))
  data = mixture_sample(2000, generator=torch.Generator().manual_seed(seed + 2))
  results = {}
  for name, rf in (('1-rectified flow', rf1), ('2-rectified flow', rf2)):
    straightness, one_step_error, _, one_step = flow_statistics(rf, x0)
    results[name] = (rf, straightness, one_step_error, energy_distance(one_step, data))
  return results, x0


def plot_trajectories(results, x0, path, shown=300, ode_steps=100):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 6))
  for axis, (name, (rf, straightness, one_step_error, _)) in zip(axes, results.items()):
    z = x0[:shown]
    path_points = [z]
    with torch.no_grad():
      for i in range(ode_steps):
        z = z + rf.velocity(z, torch.full((z.shape[0],), i / ode_steps)) / ode_steps
        path_points.append(z)
    trajectory = torch.stack(path_points).numpy()  # (steps + 1, N, 2)
    axis.plot(trajectory[:, :, 0], trajectory[:, :, 1], color='tab:olive', alpha=0.25, linewidth=0.8)
    axis.scatter(trajectory[0, :, 0], trajectory[0, :, 1], s=4, color='tab:blue', label='X0 ~ N(0, I)')
    axis.scatter(trajectory[-1, :, 0], trajectory[-1, :, 1], s=4, color='tab:red', label='X1 (ODE)')
    axis.set_title(f'{name}: straightness {straightness:.3f}, one-step error {one_step_error:.3f}')
    axis.set_aspect('equal')
    axis.legend(loc='upper right')
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=80)
  plt.close(figure)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='logs/reflow_2d.png', help='PNG of the trajectories')
  parser.add_argument('--train-steps', type=int, default=3000)
  parser.add_argument('--reflow-steps', type=int, default=3000)
  args = parser.parse_args()
  results, x0 = run(args.train_steps, args.reflow_steps)
  for name, (_, straightness, one_step_error, distance) in results.items():
    print(f'{name}: straightness {straightness:.4f}, one-step error vs its ODE {one_step_error:.4f}, '
          f'one-step energy distance to the data {distance:.4f}')
  plot_trajectories(results, x0, args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
