"""The one device check: the CUDA tests, the GPU report's tables and the digits demo, in one markdown file, within
8 minutes on one H100 or H200 (``make gpu-check``).

Each part has a time budget, and every process it starts is stopped at that budget (a stopped part says so in the
file), so the whole check ends within ``sum(BUDGETS)`` seconds plus start-up, however the GPU behaves:

- ``tests``: ``pytest tests/test_cuda.py`` (the fast step against the eager step, graph capture with labels, bf16
  and the fused norm, online reflow, RK45 and guided RK45 against the CPU, resident data), one row per test;
- ``train``: the CIFAR-10 DDPM++ train step at batch 128 (benchmarks/gpu_report.py, without the torch.compile
  variants): fp32 without TF32 (the baseline), the published numerics (unfused Adam), TF32, bf16, bf16
  channels_last, the defaults, the defaults with the fused norm and with the CUDA-graph step;
- ``forward``: the full DDPM++ forward at batch 1024 as the samplers call it, fp32 (TF32) and bf16;
- ``rk45``: RK45 at batch 1024 on the digits DDPM++ (eager, graphed, bf16, float64 state) against scipy;
- ``demo``: the digits demo (``main.py``, 1,000 updates) with the fastest settings that passed their tests;
- ``meanflow``: the MeanFlow train step against the rectified-flow step on the CIFAR-10 DDPM++ of two times at
  batch 64 (benchmarks/meanflow_step.py, 5 timed steps each);
- ``dit``: the class-conditional DiT-B/2 train step on ImageNet-256 latents at batch 256, fp32 (TF32) and bf16
  (benchmarks/train_step.py, 5 timed steps each): GFLOP per image, images/s and the fraction of the bf16 matmul
  peak, against issue 24's target of ``DIT_TARGET`` of that peak in bf16;
- for each fast option, whether it should become the default: every test of it passed and the step with it is at
  least ``FASTER`` times the step without it.

  make gpu-check                                    # writes logs/gpu_check.md
  python benchmarks/gpu_check.py --cpu-smoke        # any machine: tiny sizes; times each part of the script

A bare GPU machine may lack ml-collections, torch-fidelity and lpips: see docs/benchmarks.md for carrying them as
wheels.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_report  # noqa: E402

REPO_ROOT = gpu_report.REPO_ROOT
# Seconds per part on the GPU: 450 in all, under the 8 minutes of a device window with start-up to spare. The
# tests' module took under 3 minutes on an H100 before the capture tests were added; a train row is about 25 s
# (start-up, cuDNN autotuning, 3 + 10 + 2 updates, one census update); the demo's 1,000 updates of a 1.3M model;
# the MeanFlow part two processes of 7 steps each; the DiT part two processes of 6 steps of DiT-B/2 at batch 256
# (about 35 TFLOP per step) and the matmul peaks.
BUDGETS = {'tests': 160, 'train': 140, 'forward': 25, 'rk45': 35, 'demo': 25, 'meanflow': 25, 'dit': 40}
DIT_TARGET = 0.40  # DiT-B/2 at batch 256 in bf16: the fraction of the bf16 matmul peak asked for (the U-Net: 10%).
DIT_PRECISIONS = ('fp32', 'bf16')
FASTER = 1.03  # An option becomes a default only if its step is at least 3% faster (timing noise is ~1%).
TRAIN_ROWS = ('fp32, TF32 off (baseline)', 'fp32, TF32', 'bf16', 'bf16 channels_last', 'defaults',
              'defaults with model.fused_norm', 'defaults with training.cuda_graph')
FORWARD_ROWS = ('fp32, TF32', 'bf16')
DEMO_UPDATES = 1000
# (option, its --config override for the demo, the train row with it, the row without it, the tests that must
# pass: substrings of their pytest ids; None: no train row, e.g. options of the sampler).
OPTIONS = (
    ('training.cuda_graph=True', '--config.training.cuda_graph=True', 'defaults with training.cuda_graph',
     'defaults', ('graph_captured',)),
    ('model.fused_norm=True', '--config.model.fused_norm=True', 'defaults with model.fused_norm', 'defaults',
     ('fused_norm',)),
    ("training.precision='bf16'", '--config.training.precision=bf16', 'bf16', 'fp32, TF32', ('bf16',)),
    ('training.channels_last=True', '--config.training.channels_last=True', 'bf16 channels_last', 'bf16',
     ('bf16-True',)),
)


def run_meanflow_step(budget, smoke):
  """Markdown lines of benchmarks/meanflow_step.py (MeanFlow against rectified flow, each in its own process),
  stopped after ``budget`` s."""
  sizes = (['--model', 'digits', '--batch', '4', '--steps', '2', '--warmup', '1', '--device', 'cpu'] if smoke else
           ['--model', 'ddpmpp', '--batch', '64', '--steps', '5', '--warmup', '2', '--device', 'cuda'])
  command = [sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'meanflow_step.py'), *sizes]
  try:
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=budget)
  except subprocess.TimeoutExpired:
    return ['## MeanFlow step', '', f'stopped: ran past its {budget} s budget']
  if completed.returncode:
    tail = (completed.stdout + completed.stderr).strip().splitlines()[-5:]
    return ['## MeanFlow step', '', f'failed (exit status {completed.returncode}): ' + ' / '.join(tail)]
  body = completed.stdout[completed.stdout.index('machine:'):].strip().splitlines()
  return ['## MeanFlow step', '', f'`{" ".join(["python benchmarks/meanflow_step.py", *sizes])}`', ''] + body


def run_dit_step(budget, smoke):
  """Markdown lines of the DiT-B/2 train step (benchmarks/train_step.py) in each of ``DIT_PRECISIONS``, each in its
  own process stopped after its share of ``budget`` s; on the CPU (``smoke``) the digits demo's DiT."""
  sizes = (['--model', 'digits_dit', '--batch', '4', '--steps', '1', '--matmul-size', '256'] if smoke else
           ['--model', 'dit_b2_latent', '--batch', '256', '--steps', '5', '--matmul-size', '8192'])
  rows = []
  for precision in DIT_PRECISIONS:
    command = [sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'train_step.py'), *sizes,
               '--precision', precision]
    try:
      completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                                 timeout=budget / len(DIT_PRECISIONS))
    except subprocess.TimeoutExpired:
      rows.append([precision, f'stopped: ran past {budget / len(DIT_PRECISIONS):.0f} s', '', '', '', ''])
      continue
    if completed.returncode:
      tail = (completed.stdout + completed.stderr).strip().splitlines()[-3:]
      rows.append([precision, f'failed (exit status {completed.returncode}): ' + ' / '.join(tail), '', '', '', ''])
      continue
    result = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith('RESULT '))[7:])
    fraction = result['bf16_peak_fraction']
    verdict = (('meets' if fraction >= DIT_TARGET else 'misses') + f' the {DIT_TARGET:.0%} target'
               if precision == 'bf16' else '')
    rows.append([precision, f'{result["gflop_per_image"]:.1f}', f'{result["images_per_second"]:.1f}',
                 f'{result["tflops"]:.3g} (bf16 peak {result["bf16_peak_tflops"]:.3g})', f'{fraction:.1%}', verdict])
  return (['## DiT train step', '', f'`{" ".join(["python benchmarks/train_step.py", *sizes])} --precision P`', '']
          + gpu_report.markdown_table(['precision', 'GFLOP/image', 'images/s', 'TFLOP/s', 'of the bf16 peak',
                                       'target'], rows))


def run_tests(budget, smoke):
  """(markdown lines, {test id: 'passed' | 'failed' | 'skipped'}) of tests/test_cuda.py, stopped after ``budget`` s."""
  with tempfile.TemporaryDirectory() as folder:
    report = os.path.join(folder, 'junit.xml')
    command = [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', f'--junitxml={report}',
               'tests/test_cuda.py']
    try:
      completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=budget)
    except subprocess.TimeoutExpired as stopped:
      tail = (stopped.stdout or b'').decode(errors='replace').strip().splitlines()[-3:]
      return ['## CUDA tests', '', f'stopped: ran past its {budget} s budget; last output: ' + ' / '.join(tail)], {}
    outcomes = {}
    if os.path.exists(report):
      for case in ElementTree.parse(report).getroot().iter('testcase'):
        name = case.get('name')
        failed = case.find('failure') is not None or case.find('error') is not None
        outcomes[name] = 'failed' if failed else 'skipped' if case.find('skipped') is not None else 'passed'
  summary = (completed.stdout.strip().splitlines() or ['no output'])[-1]
  rows = [[name, outcome] for name, outcome in outcomes.items()]
  lines = ['## CUDA tests: `pytest tests/test_cuda.py`', '', summary, ''] + gpu_report.markdown_table(
      ['test', 'outcome'], rows)
  if smoke:
    lines += ['', '(no GPU: the CUDA tests skip themselves)']
  return lines, outcomes


def verdicts(outcomes, train):
  """(markdown lines, the demo overrides of the options that should become defaults)."""
  rows, chosen = [], []
  for option, override, with_row, without_row, patterns in OPTIONS:
    tests = {name: outcome for name, outcome in outcomes.items() if any(p in name for p in patterns)}
    ran = [outcome for outcome in tests.values() if outcome != 'skipped']
    passed = bool(ran) and all(outcome == 'passed' for outcome in ran)
    faster = train.get(with_row, {}).get('images_per_second')
    slower = train.get(without_row, {}).get('images_per_second')
    speed = faster / slower if faster and slower else None
    if not ran:
      verdict = 'keep off: its tests did not run'
    elif not passed:
      verdict = 'keep off: ' + ', '.join(name for name, outcome in tests.items() if outcome == 'failed') + ' failed'
    elif speed is None:
      verdict = 'keep off: its step was not measured'
    elif speed < FASTER:
      verdict = f'keep off: {speed:.2f}x of the step without it (needs {FASTER}x)'
    else:
      verdict = f'make it the default: tests passed, {speed:.2f}x'
      chosen.append(override)
    rows.append([option, f'{len(ran)} run, {sum(o == "passed" for o in ran)} passed',
                 gpu_report.formatted(speed, '.2f', 'x'), verdict])
  lines = ['## Should each fast option become the default?', '',
           f'Yes only where every CUDA test of it passed and the train step with it ran at least {FASTER}x the '
           f'step without it ({", ".join(f"`{o[2]}` against `{o[3]}`" for o in OPTIONS)}).', '']
  return lines + gpu_report.markdown_table(['option', 'its tests', 'speed-up', 'verdict'], rows), chosen


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.path.join('logs', 'gpu_check.md'), help='the markdown file it writes')
  parser.add_argument('--cpu-smoke', action='store_true', help='tiny sizes on the CPU: exercises the check anywhere')
  parser.add_argument('--digits-checkpoint', default='', help='digits demo checkpoint whose EMA weights RK45 uses')
  check = parser.parse_args()
  smoke = check.cpu_smoke
  # The report's sizes, with fewer timed updates than its own 20 on the GPU: the check has 8 minutes.
  report_parser = gpu_report.build_parser()
  report_flags = ['--cpu-smoke'] if smoke else ['--timed-updates=10', '--profiled-updates=2',
                                                 f'--demo-updates={DEMO_UPDATES}']
  args = report_parser.parse_args(report_flags + [f'--out={check.out}',
                                                 f'--digits-checkpoint={check.digits_checkpoint}'])
  gpu_report.resolve_sizes(report_parser, args)
  started = time.perf_counter()
  device = gpu_report.machine_lines(args)[2]
  lines = ['# GPU check', '', device, f'- torch {torch.__version__}, Python {platform.python_version()}',
           f'- {datetime.datetime.now().isoformat(timespec="seconds")}: '
           f'`{" ".join(["python benchmarks/gpu_check.py", *sys.argv[1:]])}`']
  timings = []

  def part(name, run):
    budget = BUDGETS[name]
    print(f'=== {name} (budget {budget} s)', flush=True)
    begun = time.perf_counter()
    table = run(budget)
    seconds = time.perf_counter() - begun
    timings.append([name, f'{budget}', f'{seconds:.0f}'])
    print('\n'.join(table), flush=True)
    lines.extend([''] + table)

  outcomes = {}

  def tests(budget):
    table, found = run_tests(budget, smoke)
    outcomes.update(found)
    return table

  def section(function, settings_of, rows):
    def run(budget):
      settings = [s for s in settings_of if s[0] in rows]
      args.child_timeout = budget / len(settings)
      return function(args, settings)
    return run

  part('tests', tests)
  part('train', section(gpu_report.train_section, gpu_report.TRAIN_SETTINGS, TRAIN_ROWS))
  part('forward', section(gpu_report.forward_section, gpu_report.FORWARD_SETTINGS, FORWARD_ROWS))
  args.child_timeout = BUDGETS['rk45']
  part('rk45', lambda budget: gpu_report.rk45_section(args))
  verdict_lines, chosen = verdicts(outcomes, args.results.get('train', {}))
  lines.extend([''] + verdict_lines)
  print('\n'.join(verdict_lines), flush=True)
  args.child_timeout = BUDGETS['demo']
  part('demo', lambda budget: gpu_report.demo_section(args, chosen))
  part('meanflow', lambda budget: run_meanflow_step(budget, smoke))
  part('dit', lambda budget: run_dit_step(budget, smoke))
  timings.append(['all', f'{sum(BUDGETS.values())}', f'{time.perf_counter() - started:.0f}'])
  lines.extend(['', '## Time of each part', ''] + gpu_report.markdown_table(['part', 'budget (s)', 'seconds'],
                                                                           timings))
  gpu_report.write_report(args.out, lines)


if __name__ == '__main__':
  main()
