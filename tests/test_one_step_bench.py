"""examples/one_step_bench.py at a toy size: every route trains the same number of updates and is measured by the
eval sweep's own reports (no metric code of its own); the table, the json and the side-by-side grid are written."""
import json
import math

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import losses
from examples import one_step_bench


def test_the_bench_runs_every_route_and_reports_what_the_eval_sweep_measured(tmp_path):
  summary = one_step_bench.main(['--updates', '8', '--batch', '8', '--pairs', '24', '--samples', '16', '--seeds', '0',
                                 '--small', '--workdir', str(tmp_path)])
  floor = summary['0'].pop('real_digits')
  routes = summary['0']
  assert set(routes) == {'reflow', '2rfpp', 'meanflow', 'splitmeanflow', 'imeanflow'}
  assert {route['updates'] for route in routes.values()} == {8}
  finals = {'reflow': 'distill', '2rfpp': '2rfpp', 'meanflow': 'meanflow', 'splitmeanflow': 'splitmeanflow',
            'imeanflow': 'imeanflow'}
  for name, route in routes.items():
    for steps in (1, 2, 32):
      report = json.loads((tmp_path / 'seed_0' / finals[name] / 'bench_eval' / f'report_1_{steps}step.json')
                          .read_text())
      assert report['digit_fd'] == route['digit_fd'][str(steps)] and math.isfinite(report['digit_fd'])
      assert report['nfe_mean'] == steps and report['num_samples'] == 16
      assert report['sampler'] == ('mean_flow' if 'meanflow' in name else 'euler')
    assert route['straightness_32'] >= 0 and route['seconds'] > 0
  # The 2-RF++ route trained with the recipe's times and, without VGG16 weights, its pseudo-Huber loss.
  resolved = json.loads((tmp_path / 'seed_0' / '2rfpp' / 'config.json').read_text())['reflow']
  assert (resolved['reflow_t_schedule'], resolved['reflow_loss'], resolved['init_from_ema']) == (
      'u_shaped', 'pseudo_huber', True)
  targets = {name: json.loads((tmp_path / 'seed_0' / name / 'config.json').read_text())['meanflow']['target']
             for name in ('meanflow', 'splitmeanflow', 'imeanflow')}
  assert targets == {'meanflow': 'jvp', 'splitmeanflow': 'split', 'imeanflow': 'imf'}
  powers = {name: json.loads((tmp_path / 'seed_0' / name / 'config.json').read_text())['meanflow'][
      'adaptive_weight_power'] for name in ('meanflow', 'splitmeanflow')}
  assert powers == {'meanflow': 0.75, 'splitmeanflow': 0.0}  # --split-weight-power's default: the squared error.
  table = (tmp_path / 'one_step_bench.md').read_text()
  assert all(f'| {name} |' in table for name in routes)
  assert f"| real digits (the floor) | {floor['sweep_sizes']:.2f} |" in table and f"{floor['halves']:.2f}" in table
  # Five rows (routes) of two 4x4 grids (1 and 2 steps) of 16x16 digits with 1-pixel padding, 4-pixel gaps.
  cell = 4 * (16 + 1) + 1
  assert Image.open(tmp_path / 'one_step_bench.png').size == (2 * cell + 4, 5 * (cell + 4))


def test_the_floor_is_the_fd_of_real_digits_against_themselves_at_the_sweep_sizes():
  """16 real digits against all 1,797 (the sweep's reference), and two disjoint halves: the classifier's FD of the
  permuted digits themselves; more samples than digits repeat the permutation."""
  import torch

  import evaluation_digits

  images, classifier = evaluation_digits.real_digits()[0], evaluation_digits.digit_classifier()
  order = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))
  floor = one_step_bench.real_floor(16, seed=3)
  assert floor['sweep_sizes'] == evaluation_digits.frechet_distance_digits(classifier, images[order[:16]], images)
  assert floor['halves'] == evaluation_digits.frechet_distance_digits(classifier, images[order[:898]],
                                                                      images[order[898:1796]])
  assert abs(one_step_bench.real_floor(1797, seed=3)['sweep_sizes']) < 1e-3  # All of them against all of them.
  assert one_step_bench.real_floor(1800, seed=3)['sweep_sizes'] > 0  # 1,797 and the first 3 again.


def test_a_subset_of_routes_with_the_dit_and_the_imagenet_meanflow_settings(tmp_path):
  summary = one_step_bench.main(['--updates', '4', '--batch', '8', '--samples', '16', '--seeds', '0', '--small',
                                 '--routes', 'meanflow', '1rf', '--model', 'dit', '--meanflow-settings', 'imagenet',
                                 '--set', 'optim.lr=5e-4', 'optim.optimizer=AdamW', '--set', 'model.dit_num_heads=1',
                                 '--workdir', str(tmp_path)])
  assert list(summary['0']) == ['1rf', 'meanflow', 'real_digits']
  rk45 = json.loads((tmp_path / 'seed_0' / '1rf_alone' / 'bench_eval_rk45' / 'report_1.json').read_text())
  assert rk45['sampler'] == 'rk45' and rk45['nfe_mean'] > 2 and summary['0']['1rf']['digit_fd']['rk45'] == rk45[
      'digit_fd']
  assert json.loads((tmp_path / 'seed_0' / '1rf_alone' / 'config.json').read_text())['training']['n_iters'] == 4
  assert not (tmp_path / 'seed_0' / '1rf').exists()  # The rectified-flow routes' shared stages did not run.
  resolved = json.loads((tmp_path / 'seed_0' / 'meanflow' / 'config.json').read_text())
  assert resolved['model']['name'] == 'dit' and resolved['model']['time_inputs'] == 2
  # --set reaches every stage, after --small's network (both --set flags count).
  alone = json.loads((tmp_path / 'seed_0' / '1rf_alone' / 'config.json').read_text())
  for stage in (resolved, alone):
    assert (stage['optim']['lr'], stage['optim']['optimizer'], stage['model']['dit_num_heads']) == (5e-4, 'AdamW', 1)
  m = resolved['meanflow']
  assert (m['time_mean'], m['time_std'], m['interval_fraction'], m['adaptive_weight_power']) == (0.4, 1.0, 0.25, 1.0)
  table = (tmp_path / 'one_step_bench.md').read_text()
  assert '| meanflow |' in table and 'optim.lr=5e-4, optim.optimizer=AdamW, model.dit_num_heads=1' in table
  assert Image.open(tmp_path / 'one_step_bench.png').size[1] == 2 * (4 * (16 + 1) + 1 + 4)  # Two rows.


def test_set_refuses_a_key_the_config_lacks_and_a_value_of_another_type(tmp_path):
  for setting, message in (('optim.nope=1', 'no such key'), ('nope.lr=1', 'no such key'),
                           ('optim.lr.x=1', 'no such key'), ('optim.lr=fast', 'optim.lr=fast')):
    with pytest.raises(SystemExit, match=message):
      one_step_bench.main(['--updates', '4', '--batch', '8', '--seeds', '0', '--small', '--routes', '1rf',
                           '--set', setting, '--workdir', str(tmp_path)])
  assert not (tmp_path / 'seed_0').exists()  # Refused before anything trained.


def test_the_two_distribution_meanflow_settings_train_with_their_own_end_times(tmp_path):
  one_step_bench.main(['--updates', '4', '--batch', '8', '--samples', '8', '--seeds', '0', '--small',
                       '--routes', 'meanflow', '--meanflow-settings', 'two_distributions', '--workdir', str(tmp_path)])
  m = json.loads((tmp_path / 'seed_0' / 'meanflow' / 'config.json').read_text())['meanflow']
  assert (m['time_mean'], m['time_std'], m['separate_end_times'], m['end_time_mean'], m['end_time_std']) == (
      0.6, 1.6, True, 4.0, 1.6)
  assert m['interval_fraction'] == 0.75  # The CIFAR-10 settings otherwise.


def test_set_wins_over_the_meanflow_settings_on_the_meanflow_routes(tmp_path):
  one_step_bench.main(['--updates', '4', '--batch', '8', '--samples', '8', '--seeds', '0', '--small',
                       '--routes', 'splitmeanflow', '--meanflow-settings', 'mixture', '--set',
                       'model.time_scale=999.0', 'model.interval_scale=999.0', 'meanflow.end_time_std=1.0',
                       'meanflow.adaptive_weight_power=0.5', '--workdir', str(tmp_path)])
  resolved = json.loads((tmp_path / 'seed_0' / 'splitmeanflow' / 'config.json').read_text())
  assert (resolved['model']['time_scale'], resolved['model']['interval_scale']) == (999.0, 999.0)
  m = resolved['meanflow']
  assert (m['end_time_mean'], m['end_time_std'], m['adaptive_weight_power'], m['target']) == (4.0, 1.0, 0.5, 'split')
  assert (m['separate_end_times'], m['uniform_pair_fraction']) == (True, 0.5)  # The mixture settings otherwise.
  flow = losses.build_flow(ml_collections.ConfigDict(resolved), torch.nn.Identity())
  assert (flow.uniform_pair_fraction, flow.end_time_distribution_kwargs) == (0.5, {'mean': 4.0, 'std': 1.0})


def test_report_puts_seeds_run_on_their_own_in_one_table_and_refuses_mixed_settings(tmp_path, monkeypatch):
  run = ['--updates', '4', '--batch', '8', '--samples', '8', '--small', '--routes', '1rf', 'imeanflow',
         '--workdir', str(tmp_path)]
  alone = {seed: one_step_bench.main(run + ['--seeds', str(seed)]) for seed in (0, 1)}  # Two runs, one seed each.
  run_threads = torch.get_num_threads()
  (tmp_path / 'one_step_bench.json').unlink()

  def refuse(*_):
    raise AssertionError('--report trained or evaluated')

  with monkeypatch.context() as patch:  # --report trains and sweeps nothing, and takes the runs' settings.
    patch.setattr(one_step_bench.run_lib, 'train', refuse)
    patch.setattr(one_step_bench.run_lib, 'evaluate', refuse)
    patch.setattr(one_step_bench.torch, 'get_num_threads', lambda: run_threads + 1)  # The reporter's differ.
    together = one_step_bench.main(['--report', '--seeds', '0', '1', '--workdir', str(tmp_path)])
  assert together == {'0': alone[0]['0'], '1': alone[1]['1']}
  assert json.loads((tmp_path / 'one_step_bench.json').read_text()) == together
  table = (tmp_path / 'one_step_bench.md').read_text()
  assert 'seeds [0, 1]' in table and '4 updates of batch 8' in table
  # The header gives the runs' torch and threads, not those of the process that reports them.
  assert f'; torch {torch.__version__}, {run_threads} threads\n' in table
  fd = [together[seed]['imeanflow']['digit_fd']['1'] for seed in ('0', '1')]
  assert f'| imeanflow | {np.mean(fd):.2f} ± {np.std(fd, ddof=1):.2f} |' in table
  assert '| 1rf |' in table and '| reflow |' not in table
  width, height = 4 * (16 + 1) + 1, 2 * (16 + 1) + 1  # 8 samples: two rows of 4 per cell; a row per route.
  assert Image.open(tmp_path / 'one_step_bench.png').size == (2 * width + 4, 2 * (height + 4))
  with pytest.raises(SystemExit, match='seed 2 has no finished bench run'):
    one_step_bench.main(['--report', '--seeds', '0', '2', '--workdir', str(tmp_path)])
  one_step_bench.main(run[:-2] + ['--workdir', str(tmp_path), '--seeds', '2', '--set', 'optim.lr=3e-4'])
  with pytest.raises(SystemExit, match=r"seeds 0 and 2 .* different settings \(set: \[\] against \[\['optim.lr'"):
    one_step_bench.main(['--report', '--seeds', '0', '2', '--workdir', str(tmp_path)])
