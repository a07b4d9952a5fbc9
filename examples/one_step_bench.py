"""One-step generation on the digits (CPU, no download): the four one-step routes (and, on request, the 1-RF alone)
on the same network, with the same number of training updates each, measured by the same evaluation sweep
(``run_lib.evaluate``, eval.metrics_backend='digits').

  1rf       the 1-RF alone (U updates), also solved by RK45 (the published sampler; FD and its NFE)
  reflow    1-RF (U/2 updates) -> pairs -> 2-RF (U/4) -> pairs -> one-step distillation (U/4), Liu et al. 2022
  2rfpp     the same 1-RF and pairs -> one reflow with the 2-RF++ recipe (U/2): U-shaped times (a = 4), the student
            from the 1-RF's EMA weights, and the LPIPS-Huber loss with --lpips-weights (a VGG16 file), else its
            pseudo-Huber part alone (no download)
  meanflow  MeanFlow from scratch (U updates): cifar10_meanflow.py's settings on the digits, or with
            --meanflow-settings imagenet the paper's ImageNet ones (25% of (t, r) with r != t, logit-normal times of
            mean 0.4 and std 1 in this project's time, adaptive weight p = 1), or with two_distributions the CIFAR-10
            ones with t ~ logit-normal(0.6, 1.6) and s ~ logit-normal(4, 1.6) (s the later time), or with uniform
            the CIFAR-10 ones with both times uniform on [0, 1] (every interval and every part of one trained), or
            with mixture half the pairs from two_distributions and half uniform
  splitmeanflow  the same from scratch with SplitMeanFlow's target (meanflow.target='split': interval splitting,
            no forward-mode pass; --set meanflow.split_point=midpoint for the shortcut models' half steps)
  imeanflow  the same from scratch with improved MeanFlow's target (meanflow.target='imf': the forward-mode pass
            along the network's own velocity)

--routes runs a subset (the rectified-flow routes share their 1-RF); --model dit gives every route the digits DiT
demo's network (configs/rectified_flow/digits_dit_demo.py) in place of the DDPM++.

Every route's final checkpoint is swept at 1 and 2 steps (Euler from t = eps for the rectified flows, MeanFlow jumps
for the MeanFlow) and at 32 steps, where the straightness of the sampling path is measured; the table gives the
digits' Frechet distance (FD), the straightness, the total updates and the total wall time (stages shared by two
routes count for both), as mean and spread over the seeds. Pair generation is counted in wall time, not in updates.
A last row gives the floor: the FD of as many real digits as samples against all of them (and, below the table, of
two disjoint halves), what a perfect sampler would score.

Each seed's results are kept in WORKDIR/seed_N/bench_results.json, so seeds run on their own (one process each,
in parallel) are reported together by --report, which trains nothing:

  python examples/one_step_bench.py                       # U = 2000, 3 seeds: a few hours on 2 CPU cores
  python examples/one_step_bench.py --updates 1000 --seeds 0
  python examples/one_step_bench.py --seeds 0 & python examples/one_step_bench.py --seeds 1 & wait
  python examples/one_step_bench.py --seeds 0 1 --report  # the table of both, with the runs' own settings
"""
import argparse
import ast
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atomic_files  # noqa: E402
import run_lib  # noqa: E402
from configs.rectified_flow.cifar10_meanflow import set_meanflow  # noqa: E402
from configs.rectified_flow.digits_dit_demo import get_config as digits_dit_config  # noqa: E402
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config  # noqa: E402

ROUTES = ('1rf', 'reflow', '2rfpp', 'meanflow', 'splitmeanflow', 'imeanflow')
MEANFLOW_ROUTES = {'meanflow': 'jvp', 'splitmeanflow': 'split', 'imeanflow': 'imf'}  # Route -> meanflow.target.
STEPS = (1, 2, 32)
MODELS = {'ddpmpp': digits_config, 'dit': digits_dit_config}
# set_meanflow's keyword arguments: the paper's CIFAR-10 settings (its defaults) and its ImageNet ones (Table 4 of
# Geng et al. 2025: lognorm(-0.4, 1.0) in their time, where t = 0 is data, i.e. mean +0.4 here; 25% r != t; p = 1).
# 'two_distributions': the CIFAR-10 settings with t ~ logit-normal(0.6, 1.6) and s ~ logit-normal(4, 1.6) here;
# 'uniform': the CIFAR-10 settings with both times uniform.
MEANFLOW_SETTINGS = {'cifar10': {}, 'imagenet': dict(time_mean=0.4, time_std=1.0, interval_fraction=0.25,
                                                     adaptive_weight_power=1.0),
                     'two_distributions': dict(time_mean=0.6, time_std=1.6, end_time=(4.0, 1.6)),
                     'uniform': dict(time_distribution='uniform')}
MEANFLOW_SETTINGS['mixture'] = dict(MEANFLOW_SETTINGS['two_distributions'], uniform_pair_fraction=0.5)


def base_config(args, seed, updates):
  """The digits demo's network (--model) and data, trained for ``updates`` updates with one snapshot at the end."""
  config = MODELS[args.model]()
  config.seed = seed
  config.device = 'cpu'
  if args.small and args.model == 'dit':  # A smaller network for a quick look (every route gets it).
    config.model.dit_depth, config.model.dit_hidden_size, config.model.dit_num_heads = 1, 32, 2
  elif args.small:
    config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 16, (1, 2), (8,)
  training = config.training
  training.batch_size = args.batch
  training.n_iters = updates
  training.snapshot_freq = training.snapshot_freq_for_preemption = updates
  training.snapshot_sampling = False
  training.sample_grid_steps = ()
  training.eval_freq = 10 ** 9
  training.log_freq = max(1, min(50, updates))
  config.optim.warmup = min(config.optim.warmup, max(1, updates // 10))
  for key, value in args.set:
    set_key(config, key, value)
  return config


def set_key(config, key, text):
  """``config.<key> = <text>`` as --config.<key>=<text> would set it: a Python literal (else the string), of the
  type the key holds now."""
  parts = key.split('.')
  node = config
  for part in parts:
    if not hasattr(node, 'keys') or part not in node:
      raise SystemExit(f'--set {key}: the config has no such key (the digits demo\'s keys are those of '
                       'configs/rectified_flow/digits_rf_gaussian_ddpmpp_demo.py)')
    parent, node = node, node[part]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  try:
    parent[parts[-1]] = value
  except TypeError as error:
    raise SystemExit(f'--set {key}={text}: {error}') from None


def key_value(text):
  key, separator, value = text.partition('=')
  if not separator or not key:
    raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE (e.g. optim.lr=3e-4)')
  return key, value


def reflow_config(args, seed, updates, teacher, pairs, kind):
  """A reflow stage on the digits (the demo pipeline's settings): 'pairs' from ``teacher`` into ``pairs``, or a
  student trained for ``updates`` updates on ``pairs`` ('2rf', 'distill', '2rfpp')."""
  config = base_config(args, seed, max(updates, 1))
  r = config.reflow
  r.last_flow_ckpt, r.data_root = teacher, pairs
  r.total_number_of_samples, r.pairs_per_shard = args.pairs, min(500, args.pairs)
  config.sampling.ode_tol = 1e-3
  if kind == 'pairs':
    r.reflow_type = 'generate_data_from_z0'
    return config
  r.reflow_type = 'train_reflow'
  config.optim.lr, config.optim.warmup = 2e-4, min(100, max(1, updates // 10))
  if kind == '2rf':
    r.reflow_t_schedule = 'uniform'
  elif kind == 'distill':
    r.reflow_t_schedule = 't0'
  else:  # 2-RF++: cifar10_2rfpp_train.py's recipe; the LPIPS part only where its weights are given.
    r.reflow_t_schedule, r.u_shaped_a, r.init_from_ema = 'u_shaped', 4.0, True
    r.reflow_loss = 'lpips_huber' if args.lpips_weights else 'pseudo_huber'
    r.lpips_weights_path = args.lpips_weights
  return config


def checkpoint(workdir):
  return os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth')


def timed(seconds, key, function, *arguments):
  started = time.time()
  function(*arguments)
  seconds[key] = time.time() - started


def sweep(config, workdir, sampler, samples):
  """The eval sweep of the stage's final checkpoint at STEPS steps ({steps: report}), or for sampler 'rk45' by the
  adaptive solver ({'rk45': report})."""
  config = config.copy_and_resolve_references()
  e = config.eval
  e.begin_ckpt = e.end_ckpt = 1
  e.enable_sampling, e.metrics_backend = True, 'digits'
  e.num_samples, e.batch_size = samples, min(500, samples)
  if sampler == 'rk45':
    config.sampling.use_ode_sampler, config.sampling.sample_steps = 'rk45', ()
    return {'rk45': run_lib.evaluate(config, workdir, 'bench_eval_rk45')[0]}
  config.sampling.use_ode_sampler, config.sampling.sample_steps = sampler, STEPS
  return {r['sample_steps']: r for r in run_lib.evaluate(config, workdir, 'bench_eval')}


# The arguments that define a run: --report takes them from the seeds' results and requires them equal.
RUN_SETTINGS = ('updates', 'pairs', 'samples', 'batch', 'small', 'routes', 'model', 'meanflow_settings',
                'split_weight_power', 'set', 'lpips_weights')


def run_settings(args):
  return {name: [list(pair) for pair in args.set] if name == 'set' else getattr(args, name) for name in RUN_SETTINGS}


def save_seed(workdir, seed, args, results):
  """WORKDIR/seed_N/bench_results.json: the run's settings and its routes' results (eval folders relative to
  the workdir), written atomically."""
  routes = {route: {**result, 'reports': {str(key): report for key, report in result['reports'].items()},
                    'eval_folder': os.path.relpath(result['eval_folder'], workdir)}
            for route, result in results.items()}
  atomic_files.write_json(os.path.join(workdir, f'seed_{seed}', 'bench_results.json'),
                          {'settings': run_settings(args), 'environment': environment(), 'routes': routes})


def environment():
  """What the header says a run ran on (kept per seed: --report runs in another process, with other threads)."""
  return f'torch {torch.__version__}, {torch.get_num_threads()} threads'


def load_seeds(workdir, seeds):
  """({seed: results}, settings, environments) from the seeds' bench_results.json, as run_seed returned them;
  environments: the runs' torch and threads, one entry per distinct one (runs saved before they were kept: a
  note that says so)."""
  all_results, first, environments = {}, None, []
  for seed in seeds:
    path = os.path.join(workdir, f'seed_{seed}', 'bench_results.json')
    if not os.path.exists(path):
      raise SystemExit(f'--report: {path} does not exist: seed {seed} has no finished bench run in {workdir}; run '
                       f'it first without --report (--seeds {seed} --workdir {workdir} and the run\'s settings)')
    with open(path, encoding='utf-8') as handle:
      saved = json.load(handle)
    first = first or (seed, saved['settings'])
    run_environment = saved.get('environment', 'torch and threads not recorded')
    if run_environment not in environments:
      environments.append(run_environment)
    for name, value in saved['settings'].items():
      if first[1][name] != value:
        raise SystemExit(f'--report: seeds {first[0]} and {seed} in {workdir} were run with different settings '
                         f'({name}: {first[1][name]!r} against {value!r}); report them from separate workdirs')
    all_results[seed] = {
        route: {**result, 'reports': {int(key) if key.isdigit() else key: report
                                      for key, report in result['reports'].items()},
                'eval_folder': os.path.join(workdir, result['eval_folder'])}
        for route, result in saved['routes'].items()}
  return all_results, first[1], environments


def run_seed(args, seed):
  """Trains and sweeps the chosen routes for one seed; returns {route: {'reports', 'updates', 'seconds'}}."""
  root = os.path.join(args.workdir, f'seed_{seed}')
  u = args.updates
  dirs = {name: os.path.join(root, name) for name in ('1rf_alone', '1rf', 'pairs_1rf', '2rf', 'pairs_2rf', 'distill',
                                                     '2rfpp', *MEANFLOW_ROUTES)}
  seconds, finals = {}, {}
  if '1rf' in args.routes:
    alone = base_config(args, seed, u)
    timed(seconds, '1rf_alone', run_lib.train, alone, dirs['1rf_alone'])
    finals['1rf'] = (alone, dirs['1rf_alone'], 'euler')
  if 'reflow' in args.routes or '2rfpp' in args.routes:
    timed(seconds, '1rf', run_lib.train, base_config(args, seed, u // 2), dirs['1rf'])
    timed(seconds, 'pairs_1rf', run_lib.reflow,
          reflow_config(args, seed, 0, checkpoint(dirs['1rf']), dirs['pairs_1rf'], 'pairs'),
          os.path.join(root, 'tmp'))
  if 'reflow' in args.routes:
    two_rf = reflow_config(args, seed, u // 4, checkpoint(dirs['1rf']), dirs['pairs_1rf'], '2rf')
    timed(seconds, '2rf', run_lib.reflow, two_rf, dirs['2rf'])
    timed(seconds, 'pairs_2rf', run_lib.reflow,
          reflow_config(args, seed, 0, checkpoint(dirs['2rf']), dirs['pairs_2rf'], 'pairs'),
          os.path.join(root, 'tmp'))
    distill = reflow_config(args, seed, u - u // 2 - u // 4, checkpoint(dirs['2rf']), dirs['pairs_2rf'], 'distill')
    timed(seconds, 'distill', run_lib.reflow, distill, dirs['distill'])
    finals['reflow'] = (distill, dirs['distill'], 'euler')
  if '2rfpp' in args.routes:
    plus = reflow_config(args, seed, u - u // 2, checkpoint(dirs['1rf']), dirs['pairs_1rf'], '2rfpp')
    timed(seconds, '2rfpp', run_lib.reflow, plus, dirs['2rfpp'])
    finals['2rfpp'] = (plus, dirs['2rfpp'], 'euler')
  for route, target in MEANFLOW_ROUTES.items():
    if route in args.routes:
      meanflow = set_meanflow(base_config(args, seed, u), **MEANFLOW_SETTINGS[args.meanflow_settings],
                              target=target)
      meanflow.sampling.sample_steps = ()
      if route == 'splitmeanflow':
        meanflow.meanflow.adaptive_weight_power = args.split_weight_power
      for key, value in args.set:  # --set wins over the route's MeanFlow keys: model.time_scale=999 is measurable.
        set_key(meanflow, key, value)
      timed(seconds, route, run_lib.train, meanflow, dirs[route])
      finals[route] = (meanflow, dirs[route], 'mean_flow')

  stages = {'1rf': ('1rf_alone',), 'reflow': ('1rf', 'pairs_1rf', '2rf', 'pairs_2rf', 'distill'),
            '2rfpp': ('1rf', 'pairs_1rf', '2rfpp'), **{route: (route,) for route in MEANFLOW_ROUTES}}
  updates = {'1rf': u, 'reflow': u // 2 + u // 4 + (u - u // 2 - u // 4), '2rfpp': u // 2 + (u - u // 2),
             **{route: u for route in MEANFLOW_ROUTES}}
  results = {}
  for route in args.routes:
    config, workdir, sampler = finals[route]
    reports = sweep(config, workdir, sampler, args.samples)
    if route == '1rf':
      reports.update(sweep(config, workdir, 'rk45', args.samples))
    results[route] = {'reports': reports, 'updates': updates[route],
                      'seconds': sum(seconds[stage] for stage in stages[route]),
                      'eval_folder': os.path.join(workdir, 'bench_eval')}
  return results


def real_floor(samples, seed):
  """The digit FD that real digits score at the sweep's sizes (the floor of every route's FD): ``samples`` digits
  (a random permutation by ``seed``, the digits repeated where more are asked than the 1,797) against all of them,
  the sweep's reference; and two disjoint halves of the digits against each other."""
  import evaluation_digits

  images, classifier = evaluation_digits.real_digits()[0], evaluation_digits.digit_classifier()
  order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
  half = len(images) // 2
  return {'sweep_sizes': evaluation_digits.frechet_distance_digits(classifier, images[order.repeat(
              -(-samples // len(images)))[:samples]], images),
          'halves': evaluation_digits.frechet_distance_digits(classifier, images[order[:half]],
                                                              images[order[half:2 * half]])}


def spread(values):
  values = np.asarray(values, dtype=float)
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def table(all_results, seeds, routes, floors):
  """The markdown table: a row per route, then the floor (``real_floor`` per seed) at the sweep's sizes."""
  lines = ['| route | FD, 1 step | FD, 2 steps | FD, 32 steps | straightness, 32 steps | FD, RK45 (NFE) | updates | '
           'wall time (s) |', '|---|---|---|---|---|---|---|---|']
  for route in routes:
    runs = [all_results[seed][route] for seed in seeds]
    fd = {k: spread([run['reports'][k]['digit_fd'] for run in runs]) for k in STEPS}
    straight = spread([run['reports'][32]['straightness'] for run in runs])
    rk45 = '-'
    if 'rk45' in runs[0]['reports']:
      rk45 = (f"{spread([run['reports']['rk45']['digit_fd'] for run in runs])} "
              f"({spread([run['reports']['rk45']['nfe_mean'] for run in runs])})")
    lines.append(f'| {route} | {fd[1]} | {fd[2]} | {fd[32]} | {straight} | {rk45} | {runs[0]["updates"]} | '
                 f'{spread([run["seconds"] for run in runs])} |')
  floor = spread([floors[seed]['sweep_sizes'] for seed in seeds])
  lines.append(f'| real digits (the floor) | {floor} | {floor} | {floor} | - | - | - | - |')
  halves = spread([floors[seed]['halves'] for seed in seeds])
  return '\n'.join(lines) + (f'\n\nThe floor: as many real digits as samples, against all of them (the reference of '
                             f'the sweep); two disjoint halves of the digits score {halves}.')


def grid(all_results, seed, routes, path, per_cell=16):
  """One PNG: a row per route (in ``routes`` order), its 1-step samples on the left and 2-step on the right (the
  first ``per_cell`` samples of the sweep, the same noise for every route)."""
  from torchvision.utils import make_grid, save_image

  rows = []
  for route in routes:
    cells = []
    for steps in (1, 2):
      folder = os.path.join(all_results[seed][route]['eval_folder'], f'ckpt_1_{steps}step')
      with np.load(os.path.join(folder, 'round_00000.npz'), allow_pickle=False) as data:
        images = torch.from_numpy(data['images'][:per_cell]).float() / 255.0
      cells.append(make_grid(images, nrow=int(per_cell ** 0.5), padding=1, pad_value=1.0))
    rows.append(torch.cat([cells[0], torch.ones(cells[0].shape[0], cells[0].shape[1], 4), cells[1]], dim=2))
  save_image(torch.cat([torch.cat([row, torch.ones(row.shape[0], 4, row.shape[2])], dim=1) for row in rows], dim=1),
             path)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--updates', type=int, default=2000, help='training updates of every route (default 2000)')
  parser.add_argument('--pairs', type=int, default=2000, help='reflow pairs generated per pair stage')
  parser.add_argument('--samples', type=int, default=1000, help='samples per step count in the sweep')
  parser.add_argument('--batch', type=int, default=64, help='global batch of every route (the demo: 64)')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--workdir', default='logs/one_step_bench')
  parser.add_argument('--lpips-weights', default='', help='VGG16 weights file: 2-RF++ with its LPIPS-Huber loss')
  parser.add_argument('--small', action='store_true', help='a smaller network for every route (a quick look)')
  parser.add_argument('--routes', nargs='+', choices=ROUTES, default=list(ROUTES[1:]),
                      help='the routes to run (default: the one-step routes, all but 1rf)')
  parser.add_argument('--model', choices=sorted(MODELS), default='ddpmpp', help="every route's network")
  parser.add_argument('--meanflow-settings', choices=sorted(MEANFLOW_SETTINGS), default='cifar10',
                      help="the MeanFlow route's (t, r) sampling and adaptive weight: the paper's CIFAR-10 or "
                           'ImageNet settings, or the CIFAR-10 ones with t and s from two logit-normals, both '
                           'uniform, or half of the pairs each (mixture)')
  parser.add_argument('--split-weight-power', type=float, default=0.0,
                      help="the splitmeanflow route's adaptive weight power p (default 0: the plain squared error; "
                           "MeanFlow's p = 0.75 or 1 let its own near-zero output satisfy its interval targets)")
  parser.add_argument('--set', type=key_value, nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                      help='config keys of every training stage, set before the stage\'s own settings, which win '
                           '(a reflow student\'s learning rate of 2e-4), except on the MeanFlow routes, where --set '
                           'wins over --meanflow-settings and --split-weight-power (model.time_scale=999 '
                           'model.interval_scale=999: the published time scale), e.g. --set optim.lr=3e-4 '
                           'optim.warmup=0')
  parser.add_argument('--report', action='store_true',
                      help="train nothing: the table, json, md and grid of --seeds from their finished runs in "
                           "--workdir (each seed's bench_results.json), with the runs' own settings, which must agree")
  args = parser.parse_args(argv)
  args.routes = [route for route in ROUTES if route in args.routes]
  if args.report:
    all_results, settings, environments = load_seeds(args.workdir, args.seeds)
    vars(args).update(settings, set=[tuple(pair) for pair in settings['set']])
  if args.updates < 4:
    parser.error('--updates must be at least 4 (the reflow route splits it into 2 + 1 + 1 quarters)')
  if args.pairs < args.batch:
    parser.error(f'--pairs ({args.pairs}) must hold at least one batch (--batch {args.batch})')
  os.makedirs(args.workdir, exist_ok=True)
  if not args.report:
    environments = [environment()]
    all_results = {}
    for seed in args.seeds:
      all_results[seed] = run_seed(args, seed)
      save_seed(args.workdir, seed, args, all_results[seed])
  floors = {seed: real_floor(args.samples, seed) for seed in args.seeds}
  text = table(all_results, args.seeds, args.routes, floors)
  png = grid(all_results, args.seeds[0], args.routes, os.path.join(args.workdir, 'one_step_bench.png'))
  summary = {str(seed): {route: {'digit_fd': {str(k): report['digit_fd'] for k, report in run['reports'].items()},
                                 'straightness_32': run['reports'][32]['straightness'], 'updates': run['updates'],
                                 'seconds': run['seconds']} for route, run in routes.items()}
             for seed, routes in all_results.items()}
  for seed, floor in floors.items():
    summary[str(seed)]['real_digits'] = floor
  atomic_files.write_json(os.path.join(args.workdir, 'one_step_bench.json'), summary)
  network = {'ddpmpp': 'DDPM++', 'dit': 'DiT'}[args.model]
  header = (f'digits, {network} ({"small" if args.small else "the demo size"}), {args.updates} updates of batch '
            f'{args.batch} per route, {args.pairs} pairs, {args.samples} samples, seeds {args.seeds}, MeanFlow with '
            f'the {args.meanflow_settings} settings'
            + ''.join(f', {key}={value}' for key, value in args.set)
            + '; ' + '; '.join(environments))
  with open(os.path.join(args.workdir, 'one_step_bench.md'), 'w', encoding='utf-8') as handle:
    handle.write(f'{header}\n\n{text}\n\nGrid (rows: {", ".join(args.routes)}; left 1 step, right 2 steps): {png}\n')
  print(header)
  print(text)
  print(f'grid: {png}')
  return summary


if __name__ == '__main__':
  main()
