"""One report of a GPU's speed with this framework: the train step, the sampler's network call, RK45, the demo.

On a CUDA machine, each configuration in its own process (so that TF32, torch.compile and cuDNN settings do not
leak from one to the next), it measures

- the CIFAR-10 DDPM++ train step at batch 128 as the training loop makes it (``run_lib.run_training`` fed one fixed
  synthetic batch: forward, backward, clipping, Adam, EMA; the data path is left out) with fp32 without TF32 first
  (the baseline), then with the published numerics (unfused Adam), fp32 with TF32, bf16, bf16 channels_last, the
  torch.compile variants (--compile: minutes each) and the config's defaults: images/s and the ratio to the
  baseline; kernels per update and the device's busy fraction from torch.profiler (the summed durations of the
  CUDA kernels of the profiled updates over their wall time; the profiler slows the host a little, so the fraction
  is a lower bound); peak memory (``torch.cuda.max_memory_allocated`` over the timed updates); operators and host
  reads per update (``speed.dispatch_census.DispatchCensus``, not taken under torch.compile);
- the full DDPM++ forward at batch 1024 as the samplers call it (``sampling.network_velocity``) in fp32 and bf16,
  built and timed by benchmarks/sampling_speed.py's ``network_call`` and ``time_network_call``;
- RK45 through ``sampling.get_sampling_fn`` (tol 1e-5) with the digits demo's DDPM++ at batch 1024, eager, from
  CUDA graphs, in bf16 and with a float64 state, against scipy's ``solve_ivp`` on the same problem (the driver of
  benchmarks/sampling_speed.py); the EMA weights of --digits-checkpoint, else random weights with model.init_scale 1
  (an untrained DDPM++ is an almost constant field that RK45 crosses in 8 calls);
- with --demo, the wall time of the digits demo: ``main.py`` on its config with ``--device cuda``, run as
  benchmarks/demo_speed.py runs it.

Every table is printed as it is done and all of them are written, under the machine's name and the torch version,
to --out.

  python benchmarks/gpu_report.py                                   # writes logs/gpu_report.md
  python benchmarks/gpu_report.py --compile --demo --digits-checkpoint logs/digits_demo/checkpoints/checkpoint_3.pth
  python benchmarks/gpu_report.py --cpu-smoke --demo                # any machine: tiny sizes, exercises the script
"""
import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.autograd import DeviceType

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import losses  # noqa: E402
import run_lib  # noqa: E402
import sampling  # noqa: E402
from benchmarks import demo_speed, sampling_speed, train_step  # noqa: E402
from benchmarks.timing import peak_rss_bytes, synchronize, timed  # noqa: E402
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config  # noqa: E402
from datasets import Batch  # noqa: E402
from speed import cuda_graphs  # noqa: E402
from speed.dispatch_census import DispatchCensus  # noqa: E402
from speed.precision import resolve_precision  # noqa: E402

MODELS = {'ddpmpp': train_step.MODELS['ddpmpp'], 'digits': ('digits demo DDPM++ 16x16', digits_config)}

BASELINE = {'training.precision': 'fp32', 'training.allow_tf32': False}
# (label, config overrides 'section.key': value); the defaults row takes its description from the child.
TRAIN_SETTINGS = (
    ('fp32, TF32 off (baseline)', BASELINE),
    ('fp32, TF32 off, unfused Adam (published numerics)', {**BASELINE, 'optim.fused': False}),
    ('fp32, TF32', {'training.precision': 'fp32', 'training.allow_tf32': True}),
    ('bf16', {'training.precision': 'bf16'}),
    ('bf16 channels_last', {'training.precision': 'bf16', 'training.channels_last': True}),
    ('fp32, TF32, torch.compile', {'training.precision': 'fp32', 'training.allow_tf32': True,
                                   'training.compile': True}),
    ('bf16 channels_last, torch.compile', {'training.precision': 'bf16', 'training.channels_last': True,
                                           'training.compile': True}),
    ('bf16 channels_last, fused GroupNorm+SiLU', {'training.precision': 'bf16', 'training.channels_last': True,
                                                  'model.fused_norm': True}),
    ('bf16 channels_last, fused GroupNorm+SiLU, CUDA graph', {'training.precision': 'bf16',
                                                             'training.channels_last': True,
                                                             'model.fused_norm': True, 'training.cuda_graph': True}),
    ('defaults', {}),
    ('defaults with training.cuda_graph', {'training.cuda_graph': True}),
    ('defaults with model.fused_norm', {'model.fused_norm': True}),
)
# The sampler's network call: (label, sampling.precision, TF32, channels_last, CUDA graph).
FORWARD_SETTINGS = (
    ('fp32, TF32 off (baseline)', 'fp32', False, False, False),
    ('fp32, TF32', 'fp32', True, False, False),
    ('bf16', 'bf16', True, False, False),
    ('bf16 channels_last', 'bf16', True, True, False),
    ('bf16, CUDA graph', 'bf16', True, False, True),
)
# RK45 rows: (label, sampling overrides, TF32 for matmuls and convolutions; None: torch's defaults, as --mode eval).
RK45_SETTINGS = (
    ('torch, fp32, TF32 off, eager', {'precision': 'fp32', 'cuda_graph': False}, False),
    ('torch, fp32, TF32 off, CUDA graph', {'precision': 'fp32', 'cuda_graph': True}, False),
    ('torch, sampler defaults', {}, None),
    ('torch, bf16, CUDA graph', {'precision': 'bf16', 'cuda_graph': True}, None),
    ('torch, float64 state, fp32, TF32 off, CUDA graph',
     {'ode_state_dtype': 'float64', 'precision': 'fp32', 'cuda_graph': True}, False),
)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers.

def apply_overrides(config, overrides):
  for name, value in overrides.items():
    section, key = name.split('.')
    config[section][key] = value


def set_tf32(matmul, convolutions):
  torch.backends.cuda.matmul.allow_tf32 = matmul
  torch.backends.cudnn.allow_tf32 = convolutions


def peak_memory_gib(device):
  """CUDA: the most memory allocated since the last reset; CPU: the process's peak RSS."""
  if device.type == 'cuda':
    return torch.cuda.max_memory_allocated(device) / 2**30
  return peak_rss_bytes() / 2**30


def reset_peak_memory(device):
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)


def is_kernel(event):
  """A CUDA kernel of a profiler trace (not a memcpy, a memset or a range annotated on the GPU timeline)."""
  return (event.device_type == DeviceType.CUDA and not getattr(event, 'is_user_annotation', False)
          and not event.name.startswith(('Memcpy', 'Memset')))


def formatted(value, spec, suffix=''):
  return 'n/a' if value is None else f'{value:{spec}}{suffix}'


def ratio(value, baseline):
  """``value / baseline`` to two places, or 'n/a' where the baseline did not run."""
  return 'n/a' if baseline is None else f'{value / baseline:.2f}'


def markdown_table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]


def failure(completed):
  """What a failed process (``subprocess.CompletedProcess``) amounts to: its exit status and last line of stderr."""
  lines = [line for line in completed.stderr.splitlines() if line.strip()] or ['no output']
  return f'failed (exit {completed.returncode}): {lines[-1].strip()[:200]}'


# ---------------------------------------------------------------------------------------------------------------
# The train step, measured inside the training loop.

class MeasurementDone(Exception):
  """Raised by the batch source once everything is measured: it ends the training run before any checkpoint."""


class MeasuredUpdates:
  """The batch source of ``run_lib.run_training`` for this report: one fixed batch every update, and between updates
  the measurements: ``warmup`` updates (compilation, cuDNN autotuning, Adam's state), ``timed`` updates for the time
  and peak memory, ``profiled`` updates under torch.profiler (CUDA only), one update under the census, then the end
  of the run (``MeasurementDone``)."""

  def __init__(self, x1, device, *, warmup, timed, profiled, census):
    if warmup < 1 or timed < 1:
      raise ValueError(f'at least one warm-up and one timed update are needed, got {warmup} and {timed}')
    self.x1, self.device = x1, device
    self.warmup, self.timed, self.profiled, self.take_census = warmup, timed, profiled, census
    self.result = {'kernels_per_update': None, 'busy': None, 'operators_per_update': None,
                   'host_reads_per_update': None}
    self.clock = None
    self.profiler = self.census = None

  def now(self):
    synchronize(self.device)
    return time.perf_counter()

  def batches(self, start_batch, device, generator):
    """``train_batches(start_batch, device, generator)`` of ``run_lib.run_training``."""
    del start_batch, device, generator  # One fixed batch in model space; the loop's generators stay unused.
    for done in itertools.count():
      self.between_updates(done)
      yield Batch(None, self.x1, slice(None))

  def between_updates(self, done):
    """Called when ``done`` updates are complete, before the next one starts."""
    timed_end = self.warmup + self.timed
    profiled_end = timed_end + self.profiled
    if done == 0:
      self.clock = self.now()
    if done == 1:
      self.result['first_update_seconds'] = self.now() - self.clock
    if done == self.warmup:
      reset_peak_memory(self.device)
      self.clock = self.now()
    if done == timed_end:
      self.result['seconds_per_update'] = (self.now() - self.clock) / self.timed
      self.result['peak_memory_gib'] = peak_memory_gib(self.device)
      if self.profiled:
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        self.profiler.start()
        self.clock = self.now()
    if self.profiled and done == profiled_end:
      wall = self.now() - self.clock
      self.profiler.stop()
      kernels = [event for event in self.profiler.events() if is_kernel(event)]
      self.result['kernels_per_update'] = len(kernels) / self.profiled
      self.result['busy'] = sum(event.time_range.elapsed_us() for event in kernels) / 1e6 / wall
    if done == profiled_end and self.take_census:
      self.census = DispatchCensus()
      self.census.__enter__()
    elif done == profiled_end + 1 and self.take_census:
      self.census.__exit__(None, None, None)
      self.result['operators_per_update'] = self.census.total
      self.result['host_reads_per_update'] = self.census.total_host_reads
    if done == profiled_end + (1 if self.take_census else 0):
      raise MeasurementDone


def describe_training(config, device):
  """The settings that decide the step's speed, as resolved on ``device``."""
  t = config.training
  parts = [resolve_precision(config, device)]
  if device.type == 'cuda':
    parts.append('TF32' if t.allow_tf32 else 'TF32 off')
  parts += [name for name, on in (('channels_last', t.channels_last), ('torch.compile', t.compile),
                                  ('CUDA graph', t.cuda_graph), ('fused GroupNorm+SiLU', config.model.fused_norm))
            if on]
  parts.append('fused Adam' if config.optim.fused else 'unfused Adam')
  return ', '.join(parts)


def measure_training(job):
  """One train-step configuration (``job['overrides']``) in the training loop; returns the measurements."""
  config = MODELS[job['model']][1]()
  config.device = job['device']
  config.training.batch_size = job['batch']
  apply_overrides(config, job['overrides'])
  never = 10 ** 9
  config.training.update(n_iters=never, log_freq=never, eval_freq=never, snapshot_freq=never,
                         snapshot_freq_for_preemption=never, snapshot_sampling=False, sample_grid_steps=())
  device = run_lib.select_device(config)
  size, channels = config.data.image_size, config.data.num_channels
  x1 = torch.rand(job['batch'], channels, size, size, device=device,
                  generator=torch.Generator(device).manual_seed(1)) * 2 - 1
  warmup = job['warmup']
  if config.training.cuda_graph:  # Its capture stays out of the timed updates.
    warmup = max(warmup, cuda_graphs.GraphedTrainStep.WARMUP_UPDATES + 2)
  compiled = config.training.compile or config.model.fused_norm
  probe = MeasuredUpdates(x1, device, warmup=warmup, timed=job['timed'],
                          profiled=job['profiled'] if device.type == 'cuda' else 0,
                          census=not compiled)  # Dynamo runs eagerly under a dispatch mode.
  with tempfile.TemporaryDirectory() as workdir:
    try:
      run_lib.run_training(config, workdir, train_batches=probe.batches, eval_batches=lambda start, device: iter(()))
    except MeasurementDone:
      pass
  result = dict(probe.result, setting=describe_training(config, device))
  result['images_per_second'] = job['batch'] / result['seconds_per_update']
  return result


# ---------------------------------------------------------------------------------------------------------------
# The sampler's network call and RK45.

def measure_forward(job):
  """The network call of the samplers at one batch (``sampling_speed.network_call``): least seconds over
  ``job['repeats']`` calls after two warm-up calls (cuDNN's first choices, the graph's capture)."""
  _, precision, tf32, channels_last, cuda_graph = job['setting']
  config = MODELS[job['model']][1]()
  device = torch.device(job['device'])
  set_tf32(tf32, tf32)
  torch.manual_seed(0)
  net = sampling_speed.build_network(config, '', device)
  velocity, flow = sampling_speed.network_call(config, net, precision, channels_last)
  if cuda_graph:
    velocity = cuda_graphs.GraphedVelocity(velocity, module=flow)
  shape = (job['batch'], config.data.num_channels, config.data.image_size, config.data.image_size)
  x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
  t = torch.full((job['batch'],), 0.5, device=device)
  _, seconds = sampling_speed.time_network_call(device, velocity, x, t, job['repeats'], warmup=2)
  return {'seconds': seconds, 'images_per_second': job['batch'] / seconds, 'peak_memory_gib': peak_memory_gib(device)}


def measure_rk45(job):
  """Every row of RK45_SETTINGS (on CUDA one untimed solve first; the least seconds of ``job['repeats']``) and scipy's
  solve_ivp on the same network, noise and tolerance; each row's largest |x1 - x1 of scipy|."""
  device = torch.device(job['device'])
  config = digits_config()
  config.model.init_scale = job['init_scale']
  config.sampling.use_ode_sampler, config.sampling.ode_tol = 'rk45', job['tol']
  torch.manual_seed(0)
  flow = losses.build_rectified_flow(config, sampling_speed.build_network(config, job['checkpoint'], device))
  shape = (job['batch'], config.data.num_channels, config.data.image_size, config.data.image_size)
  noise = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * config.sampling.init_noise_scale).to(device)
  torch_defaults = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  rows, samples = [], {}
  for label, options, tf32 in RK45_SETTINGS:
    row_config = config.copy_and_resolve_references()
    row_config.sampling.update(options)
    set_tf32(*(torch_defaults if tf32 is None else (tf32, tf32)))
    sample_fn = sampling.get_sampling_fn(row_config, shape)
    solution, seconds = sampling_speed.time_sampler(device, sample_fn, flow, noise, job['repeats'])
    rows.append({'label': label, 'nfe': solution.contributing_nfe, 'calls': solution.nfe, 'seconds': seconds})
    samples[label] = solution.x
  set_tf32(False, False)
  velocity = sampling.network_velocity(flow, 'fp32')
  (scipy_x1, scipy_nfe), scipy_seconds = timed(device, lambda: sampling_speed.scipy_rk45(
      velocity, noise, config.training.time_eps, job['tol']))
  for row in rows:
    if row['label'] in samples:
      row['difference'] = (samples[row['label']] - scipy_x1).abs().max().item()
  rows.append({'label': 'scipy solve_ivp (float64 state), fp32, TF32 off', 'nfe': scipy_nfe, 'calls': scipy_nfe,
               'seconds': scipy_seconds, 'difference': None, 'scipy': True})
  weights = job['checkpoint'] or f'random weights, model.init_scale {job["init_scale"]:g}'
  return {'rows': rows, 'weights': weights}


CHILDREN = {'train': measure_training, 'forward': measure_forward, 'rk45': measure_rk45}


def child_environment(args):
  """The environment of the processes this report starts: on the CPU (--cpu-smoke) one thread each, since on a
  shared machine a descheduled OpenMP thread stalls every operator (a digits forward of 10 ms took 3 s)."""
  return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1') if args.device == 'cpu' else None


def run_child(job, args):
  """``job`` in a fresh process of this script; its result, or {'error': ...} with the last line it wrote (or the
  time limit it ran past: ``args.child_timeout`` seconds, where set)."""
  command = [sys.executable, os.path.abspath(__file__), '--child', json.dumps(job)]
  timeout = getattr(args, 'child_timeout', None)
  try:
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=child_environment(args),
                               timeout=timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'stopped: ran past its {timeout:g} s'}
  if completed.returncode != 0:
    return {'error': failure(completed)}
  return json.loads(next(line for line in completed.stdout.splitlines() if line.startswith('RESULT '))[7:])


# ---------------------------------------------------------------------------------------------------------------
# The sections of the report.

def train_section(args, settings=TRAIN_SETTINGS):
  """The train-step table of ``settings`` (the first is the baseline); each row's result also goes to
  ``args.results['train'][label]``."""
  model_name = MODELS[args.model][0]
  rows, baseline = [], None
  results = args.results.setdefault('train', {})
  for label, overrides in settings:
    if overrides.get('training.compile') and not args.compile:
      rows.append([label, 'not run (add --compile; minutes each)'] + [''] * 6)
      continue
    print(f'--- train step: {label}', flush=True)
    result = run_child({'kind': 'train', 'model': args.model, 'batch': args.batch, 'device': args.device,
                        'overrides': overrides, 'warmup': args.warmup_updates, 'timed': args.timed_updates,
                        'profiled': args.profiled_updates}, args)
    results[label] = result
    if 'error' in result:
      rows.append([label, result['error']] + [''] * 6)
      continue
    if label == settings[0][0]:
      baseline = result['images_per_second']
    if label.startswith('defaults'):
      label = f'{label} ({result["setting"]})'
    if overrides.get('training.compile'):
      label = f'{label} (first update {result["first_update_seconds"]:.0f} s)'
    rows.append([label, f'{result["images_per_second"]:.1f}', ratio(result['images_per_second'], baseline),
                 formatted(result['busy'], '.0%'), formatted(result['kernels_per_update'], ',.0f'),
                 f'{result["peak_memory_gib"]:.2f} GiB', formatted(result['host_reads_per_update'], 'd'),
                 formatted(result['operators_per_update'], ',d')])
  title = (f'## Train step: {model_name}, batch {args.batch}\n\nThe training loop fed one fixed batch: '
           f'{args.timed_updates} timed update(s) after {args.warmup_updates} warm-up update(s) (peak memory: CUDA\'s '
           f'max allocated over them; on the CPU the process\'s peak RSS); kernels and device busy over '
           f'{args.profiled_updates} profiled update(s) (CUDA only); operators and host reads of one update (not '
           f'under torch.compile).')
  header = ['setting', 'images/s', 'x baseline', 'device busy', 'kernels/update', 'peak memory', 'host reads/update',
            'operators/update']
  return [title, ''] + markdown_table(header, rows)


def forward_section(args, settings=FORWARD_SETTINGS):
  """The sampler network-call table of ``settings`` (the first is the baseline); results in
  ``args.results['forward']``."""
  model_name = MODELS[args.model][0]
  rows, baseline = [], None
  results = args.results.setdefault('forward', {})
  for setting in settings:
    label = setting[0]
    print(f'--- network call: {label}', flush=True)
    result = run_child({'kind': 'forward', 'model': args.model, 'batch': args.forward_batch, 'device': args.device,
                        'setting': setting, 'repeats': args.forward_repeats}, args)
    results[label] = result
    if 'error' in result:
      rows.append([label, result['error'], '', ''])
      continue
    if label == settings[0][0]:
      baseline = result['images_per_second']
    rows.append([label, f'{result["images_per_second"]:,.0f}', ratio(result['images_per_second'], baseline),
                 f'{result["peak_memory_gib"]:.2f} GiB'])
  title = (f'## Sampler network call: {model_name}, batch {args.forward_batch}\n\n'
           f'`sampling.network_velocity` (no autograd), least time of {args.forward_repeats} call(s).')
  return [title, ''] + markdown_table(['network call', 'images/s', 'x baseline', 'peak memory'], rows)


def rk45_section(args):
  print('--- RK45', flush=True)
  result = run_child({'kind': 'rk45', 'batch': args.rk45_batch, 'device': args.device, 'tol': args.tol,
                      'init_scale': args.init_scale, 'checkpoint': args.digits_checkpoint,
                      'repeats': args.rk45_repeats}, args)
  title = f'## RK45: digits demo DDPM++ 16x16, batch {args.rk45_batch}, rtol = atol = {args.tol:g}'
  args.results['rk45'] = result
  if 'error' in result:
    return [title, '', result['error']]
  scipy_seconds = next(row['seconds'] for row in result['rows'] if row.get('scipy'))
  rows = []
  for row in result['rows']:
    rows.append([row['label'], f'{row["nfe"]} ({row["calls"]})', f'{row["seconds"]:.2f}',
                 f'{args.rk45_batch / row["seconds"]:,.1f}', f'{scipy_seconds / row["seconds"]:.2f}',
                 formatted(row['difference'], '.2g')])
  title += (f'\n\n{result["weights"]}; torch rows: least time of {args.rk45_repeats} solve(s) (on CUDA after one '
            f'untimed solve). NFE: the calls that shaped x1 (all calls made).')
  header = ['solver', 'NFE (calls)', 'seconds', 'images/s', 'x scipy speed', 'max abs diff to scipy']
  return [title, ''] + markdown_table(header, rows)


def demo_section(args, settings=()):
  """The wall time of ``main.py --mode train`` on the demo config (all of it, or ``args.demo_updates`` updates),
  with ``settings`` (--config overrides, e.g. ``--config.training.cuda_graph=True``) added."""
  print('--- digits demo', flush=True)
  overrides = list(settings)
  if args.demo_updates:
    overrides += [f'--config.training.n_iters={args.demo_updates}',
                  f'--config.training.log_freq={max(1, args.demo_updates // 5)}']
  title = '## Digits demo: `main.py --mode train` on ' + os.path.relpath(demo_speed.CONFIG, REPO_ROOT)
  with tempfile.TemporaryDirectory() as workdir:
    try:
      completed, seconds = demo_speed.run_demo(workdir, args.device, overrides, env=child_environment(args),
                                               timeout=getattr(args, 'child_timeout', None))
    except subprocess.TimeoutExpired:
      args.results['demo'] = {'error': 'ran past its time limit'}
      return [title, '', f'stopped: ran past its {args.child_timeout:g} s ({" ".join(overrides)})']
    if completed.returncode != 0:
      args.results['demo'] = {'error': failure(completed)}
      return [title, '', failure(completed)]
    records, config = demo_speed.read_run(workdir)
  updates = config['training']['n_iters']
  rates = demo_speed.loop_image_rates(records)
  nfes = [int(r['sample_nfe']) for r in records if 'sample_nfe' in r]
  row = [f'--device={args.device} {" ".join(overrides)}'.strip(), f'{updates:,}', f'{seconds:.1f} s',
         formatted(float(np.mean(rates)) if rates else None, '.0f'), ', '.join(map(str, nfes)) or 'n/a']
  args.results['demo'] = {'seconds': seconds, 'updates': updates, 'overrides': overrides}
  header = ['command', 'updates', 'wall time', 'loop images/s', 'snapshot sampler NFE']
  return [title + ' (start-up, training, sample grids, checkpoints)', ''] + markdown_table(header, [row])


def machine_lines(args):
  if args.device == 'cuda':
    name = torch.cuda.get_device_name(0)
    device = f'{name}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}'
  else:
    device = (f'CPU smoke run (no GPU; tiny sizes, one thread per process: the numbers exercise the script, they '
              f'measure nothing): {platform.processor() or platform.machine()}')
  command = ' '.join(['python benchmarks/gpu_report.py', *sys.argv[1:]])
  return ['# GPU report', '', f'- machine: {device}',
          f'- torch {torch.__version__}, Python {platform.python_version()}',
          f'- {datetime.datetime.now().isoformat(timespec="seconds")}: `{command}`']


# ---------------------------------------------------------------------------------------------------------------

def build_parser():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.path.join('logs', 'gpu_report.md'), help='markdown file for the tables')
  parser.add_argument('--cpu-smoke', action='store_true', help='tiny sizes on the CPU: exercises the script anywhere')
  parser.add_argument('--model', choices=sorted(MODELS), default=None, help='train step and network call model '
                      '(default ddpmpp, --cpu-smoke digits)')
  parser.add_argument('--batch', type=int, default=None, help='train step batch (default 128, --cpu-smoke 2)')
  parser.add_argument('--warmup-updates', type=int, default=None, help='updates before timing (default 3, smoke 1)')
  parser.add_argument('--timed-updates', type=int, default=None, help='timed updates (default 20, smoke 2)')
  parser.add_argument('--profiled-updates', type=int, default=3, help='updates under torch.profiler (CUDA only)')
  parser.add_argument('--compile', action='store_true', help='also the torch.compile variants (minutes each)')
  parser.add_argument('--forward-batch', type=int, default=None, help='network call batch (default 1024, smoke 2)')
  parser.add_argument('--forward-repeats', type=int, default=5, help='timed network calls; the least time is kept')
  parser.add_argument('--rk45-batch', type=int, default=None, help='RK45 batch (default 1024, smoke 2)')
  parser.add_argument('--tol', type=float, default=None, help='RK45 rtol = atol (default 1e-5, smoke 1e-3)')
  parser.add_argument('--rk45-repeats', type=int, default=None, help='timed RK45 solves per row (default 2, smoke 1)')
  parser.add_argument('--digits-checkpoint', default='', help='digits demo checkpoint whose EMA weights RK45 uses')
  parser.add_argument('--init-scale', type=float, default=1.0, help='model.init_scale of random RK45 weights')
  parser.add_argument('--demo', action='store_true', help='also time the digits demo (main.py) end to end')
  parser.add_argument('--demo-updates', type=int, default=None, help='demo updates (default: the config\'s 3,000; '
                      'smoke 10)')
  parser.add_argument('--child', help=argparse.SUPPRESS)  # A JSON job for one configuration, run by the parent.
  return parser


def resolve_sizes(parser, args):
  """Fills in the sizes left unset (those of --cpu-smoke or of the full report), the device and ``args.results``."""
  if not args.cpu_smoke and not torch.cuda.is_available():
    parser.error('CUDA is not available to this PyTorch; --cpu-smoke runs the script on the CPU at tiny sizes')
  sizes = ({'model': 'digits', 'batch': 2, 'warmup_updates': 1, 'timed_updates': 2, 'forward_batch': 2,
            'rk45_batch': 2, 'tol': 1e-3, 'rk45_repeats': 1, 'demo_updates': 10} if args.cpu_smoke else
           {'model': 'ddpmpp', 'batch': 128, 'warmup_updates': 3, 'timed_updates': 20, 'forward_batch': 1024,
            'rk45_batch': 1024, 'tol': 1e-5, 'rk45_repeats': 2, 'demo_updates': 0})
  for key, value in sizes.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.device = 'cpu' if args.cpu_smoke else 'cuda'
  args.results = {}
  return args


def main():
  parser = build_parser()
  args = parser.parse_args()
  if args.child:
    job = json.loads(args.child)
    print('RESULT ' + json.dumps(CHILDREN[job['kind']](job)), flush=True)
    return
  resolve_sizes(parser, args)
  lines = machine_lines(args)
  print('\n'.join(lines), flush=True)
  sections = [train_section, forward_section, rk45_section] + ([demo_section] if args.demo else [])
  for section in sections:
    table = section(args)
    print('\n' + '\n'.join(table), flush=True)
    lines += [''] + table
  write_report(args.out, lines)


def write_report(path, lines):
  """Writes the markdown ``lines`` to ``path`` (its folder made if needed) and says so."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as handle:
    handle.write('\n'.join(lines) + '\n')
  print(f'\nwrote {path}')


if __name__ == '__main__':
  main()
