"""Does the class-conditional digits demo draw the digit it is asked for? Class agreement and quality of each stage.

For every checkpoint given (EMA weights) it samples the same 1,000 noises, noise i asked for digit i mod 10
(100 of each), and reports:
  - agreement: the fraction of samples that the CNN digit classifier of ``evaluation_digits`` (trained here on the
    digits with a fixed seed, 99.4% held-out accuracy) assigns to the requested digit;
  - FD: the Frechet distance between the samples and the 1,797 real digits in that classifier's 64-d features
    (the measure of examples/digits_reflow_report.py, so its unconditional figures compare directly);
  - for adaptive RK45 samples (tolerance 1e-3) and for one-step samples x0 + v(x0, eps), with the NFE per sample
    (a guided step is one call on a doubled batch: two network evaluations per sample).
The 1-rectified flow is measured at each guidance setting of --guidance (w over all of t, or w where t >= t_min);
its students (2-RF, distillation) learned the flow guided at w = 2 where t >= 0.5 and are sampled unguided. An
unconditional checkpoint, if present, gives the FD to compare with.

  python examples/digits_conditional_report.py        # the checkpoints of the conditional pipeline (docs/digits.md)
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
import sampling
from configs.rectified_flow.digits_conditional_demo import get_config as conditional_config
from configs.rectified_flow.digits_reflow_demo import (
  CONDITIONAL_ONE_RF_CHECKPOINT,
  CONDITIONAL_TWO_RF_CHECKPOINT,
  ONE_RF_CHECKPOINT,
)
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as unconditional_config
from rectified_flow_pytorch import flow_math, solvers

DISTILLED_CHECKPOINT = 'logs/digits_conditional_2rf_distill/checkpoints/checkpoint_3.pth'


def load_flow(config, path):
  config.reflow.last_flow_ckpt = path
  net, _ = reflow.load_teacher(config, torch.device('cpu'))
  return losses.build_rectified_flow(config, net).eval()


def measure(flow, noise, labels, guidance_scale, eps, classifier, real, straightness_num, guidance_interval=None):
  """{'rk45': (agreement, FD, NFE per sample), 'one_step': (...), 'straightness': S of the first
  ``straightness_num`` noises (None for 0), 'images': RK45 samples}."""
  calls = 2 if flow.is_guided(labels, guidance_scale, guidance_interval) else 1

  def velocity(x, t, labels=labels):
    return flow.velocity(x, t, labels=labels, guidance_scale=guidance_scale, guidance_interval=guidance_interval)

  result = {'straightness': None}
  if straightness_num:
    part = labels[:straightness_num] if labels is not None else None
    result['straightness'] = evaluation.straightness(lambda x, t: velocity(x, t, part), noise[:straightness_num],
                                                     steps=100, eps=eps).mean().item()
  with torch.no_grad():
    one_step, _ = solvers.euler(velocity, noise, steps=1, t0=eps, step_size=1.0)
    many_step, nfe = solvers.rk45(velocity, noise, t0=eps, t1=1.0, rtol=1e-3, atol=1e-3)
  for name, images, evaluations in (('rk45', many_step, nfe * calls), ('one_step', one_step, calls)):
    agreement = (evaluation_digits.class_accuracy(classifier, images, labels) if labels is not None else None)
    result[name] = (agreement, evaluation_digits.frechet_distance_digits(classifier, images, real), evaluations)
  result['images'] = many_step
  return result


def report(args):
  torch.set_grad_enabled(False)
  classifier, accuracy = evaluation_digits.train_classifier()
  real, _, _ = evaluation_digits.real_digits()
  print(f'digit classifier: held-out accuracy {accuracy:.3f}')
  noise = flow_math.indexed_noise(args.seed, 0, args.num, (1, 16, 16))
  labels = torch.arange(args.num) % 10
  eps = conditional_config().training.time_eps
  runs = []
  if os.path.isfile(args.unconditional):
    runs.append(('unconditional 1-RF', unconditional_config(), args.unconditional, None, (1.0, 0.0), False))
  for setting in args.guidance:  # (w, t_min); only these 1-RF rows may be drawn in the grid.
    w, t_min = setting
    name = f'conditional 1-RF, w={w:g}' + (f', t>={t_min:g}' if t_min else '')
    runs.append((name, conditional_config(), args.one_rf, labels, setting, setting == args.grid_guidance))
  runs.append(('conditional 2-RF', conditional_config(), args.two_rf, labels, (1.0, 0.0), False))
  runs.append(('2-RF + one-step distillation', conditional_config(), args.distilled, labels, (1.0, 0.0), False))
  rows = []
  for name, config, path, run_labels, (w, t_min), in_grid in runs:
    interval = (t_min, 1.0) if t_min else None
    if not os.path.isfile(path):
      print(f'{name}: {path} not found, skipped')
      continue
    result = measure(load_flow(config, path), noise, run_labels, w, eps, classifier, real, args.straightness_num,
                     interval)
    rows.append((name, result))
    if args.grid and in_grid:
      grid, columns = sampling.per_class_grid(result['images'].add(1).div(2), labels, per_class=10)
      sampling.save_sample_grid(grid, args.grid, nrow=columns)
      print(f'{args.grid}: RK45 samples of {name}, one row per digit')

  def cell(value, spec):  # spec: '>W.Pf'; '-' where not measured.
    return f'{value:{spec}}' if value is not None else f'{"-":>{spec[1:].split(".")[0]}}'

  print(f'{"model":<36} {"S(Z)":>7} | {"RK45: agree":>11} {"FD":>6} {"NFE":>4} | {"1 step: agree":>13} {"FD":>7} '
        f'{"NFE":>3}')
  for name, r in rows:
    (a, fd, nfe), (a1, fd1, nfe1) = r['rk45'], r['one_step']
    print(f'{name:<36} {cell(r["straightness"], ">7.4f")} | {cell(a, ">11.3f")} {fd:>6.2f} {nfe:>4d} | '
          f'{cell(a1, ">13.3f")} {fd1:>7.1f} {nfe1:>3d}')
  return rows


def guidance_setting(text):
  """'w' -> (w, 0.0); 'w:t_min' -> (w, t_min): guidance w where t >= t_min."""
  w, _, t_min = text.partition(':')
  return float(w), float(t_min or 0.0)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--one_rf', default=CONDITIONAL_ONE_RF_CHECKPOINT)
  parser.add_argument('--two_rf', default=CONDITIONAL_TWO_RF_CHECKPOINT)
  parser.add_argument('--distilled', default=DISTILLED_CHECKPOINT)
  parser.add_argument('--unconditional', default=ONE_RF_CHECKPOINT, help='unconditional 1-RF (FD baseline)')
  t_min = conditional_config().sampling.guidance_t_min
  parser.add_argument('--guidance', type=lambda s: [guidance_setting(part) for part in s.split(',')],
                      default=[(1.0, 0.0), (2.0, 0.0), (2.0, t_min)],
                      help="guidance of the conditional 1-RF, comma-separated: 'w' guides all of t, 'w:t_min' only "
                           f"t >= t_min (default: 1,2,2:{t_min:g}, the last the demo's own setting)")
  parser.add_argument('--grid', default='logs/digits_conditional_grid.png', help="PNG of the 1-RF's RK45 samples")
  parser.add_argument('--grid_guidance', type=guidance_setting, default=(2.0, t_min),
                      help="the guidance ('w' or 'w:t_min') of the 1-RF samples drawn in --grid")
  parser.add_argument('--num', type=int, default=1000, help='noises per model (noise i asks for digit i mod 10)')
  parser.add_argument('--seed', type=int, default=12345)
  parser.add_argument('--straightness_num', type=int, default=1000,
                      help='noises of the 100-step straightness measure (the first ones; 0 skips it)')
  report(parser.parse_args())


if __name__ == '__main__':
  main()
