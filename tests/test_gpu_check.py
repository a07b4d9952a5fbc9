"""benchmarks/gpu_check.py's judgement of the fast options and its time plan (the check itself needs a GPU)."""
from benchmarks import gpu_check


def outcomes(**overrides):
  """Every CUDA test that judges an option, passed, but for ``overrides`` (pytest id -> outcome)."""
  tests = {'test_the_graph_captured_step_equals_the_eager_step': 'passed',
           'test_a_bf16_graph_captured_step_follows_the_eager_bf16_step': 'passed',
           'test_the_fused_norm_step_follows_the_eager_step[fp32-False]': 'passed',
           'test_the_fused_norm_step_follows_the_eager_step[bf16-True]': 'passed',
           'test_rk45_on_cuda_matches_the_cpu[True]': 'passed'}
  return {**tests, **overrides}


def train(**images_per_second):
  rows = {'defaults': 1000.0, 'fp32, TF32': 1000.0, 'bf16': 1000.0, 'bf16 channels_last': 1000.0,
          'defaults with model.fused_norm': 1000.0, 'defaults with training.cuda_graph': 1000.0}
  rows.update({label.replace('_', ' '): value for label, value in images_per_second.items()})
  return {label: {'images_per_second': value} for label, value in rows.items()}


def test_an_option_becomes_a_default_only_if_its_tests_passed_and_its_step_is_faster():
  measured = train(bf16=1500.0)  # bf16 1.5x fp32; channels_last then 1000 / 1500 of bf16.
  measured['defaults with training.cuda_graph'] = {'images_per_second': 1200.0}
  measured['defaults with model.fused_norm'] = {'images_per_second': 1020.0}  # 1.02x: below the 1.03x asked.
  lines, chosen = gpu_check.verdicts(outcomes(), measured)
  assert chosen == ['--config.training.cuda_graph=True', '--config.training.precision=bf16']
  table = '\n'.join(lines)
  assert 'make it the default: tests passed, 1.20x' in table and 'keep off: 1.02x' in table
  assert 'keep off: 0.67x' in table  # channels_last, slower than bf16 without it.


def test_a_failed_or_skipped_test_keeps_its_option_off_however_fast():
  measured = train(bf16=2000.0)
  measured['defaults with training.cuda_graph'] = {'images_per_second': 3000.0}
  failed = outcomes(test_a_bf16_graph_captured_step_follows_the_eager_bf16_step='failed')
  lines, chosen = gpu_check.verdicts(failed, measured)
  assert chosen == []  # The failed test is a CUDA-graph test and a bf16 test.
  assert 'test_a_bf16_graph_captured_step_follows_the_eager_bf16_step failed' in '\n'.join(lines)
  skipped = {name: 'skipped' for name in outcomes()}
  lines, chosen = gpu_check.verdicts(skipped, measured)
  assert chosen == [] and '\n'.join(lines).count('keep off: its tests did not run') == len(gpu_check.OPTIONS)


def test_an_unmeasured_step_keeps_its_option_off():
  measured = train()
  measured['defaults with training.cuda_graph'] = {'error': 'stopped: ran past its 21 s'}
  lines, chosen = gpu_check.verdicts(outcomes(), measured)
  assert '--config.training.cuda_graph=True' not in chosen
  assert 'keep off: its step was not measured' in '\n'.join(lines)


def test_the_parts_fit_in_eight_minutes_with_time_to_start():
  assert set(gpu_check.BUDGETS) == {'tests', 'train', 'forward', 'rk45', 'demo', 'meanflow', 'dit'}
  assert sum(gpu_check.BUDGETS.values()) <= 8 * 60 - 30
