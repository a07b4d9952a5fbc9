"""MeanFlow in the framework (training.objective = 'meanflow'): the one training loop with its resume, micro-batch
and fault guarantees, bf16, class-conditional training with trained-in guidance, the 'mean_flow' sampler, snapshot
grids and the eval sweep at 1 and 2 steps, and clear errors for what does not fit."""
import json

import pytest
import torch

import checkpoints
import datasets
import evaluation
import evaluation_digits
import losses
import run_lib
import sampling
from datasets import streams
from rectified_flow_pytorch import ImprovedMeanFlow, MeanFlow, SplitMeanFlow, flow_math
from tests.helpers import flat_state, tiny_digits_config

# MeanFlow's, SplitMeanFlow's (no forward mode) and improved MeanFlow's (the network's own velocity as the tangent).
TARGETS = pytest.mark.parametrize('target', ['jvp', 'split', 'imf'])


def meanflow_config(n_iters=4, target='jvp', **training):
  config = tiny_digits_config(**{'n_iters': n_iters, 'snapshot_freq': 100, 'snapshot_freq_for_preemption': 2,
                                 **training})
  config.training.objective = 'meanflow'
  config.model.time_inputs = 2
  config.meanflow.interval_fraction = 0.5  # Half the samples on intervals, half on the rectified-flow diagonal.
  config.meanflow.target = target
  config.sampling.use_ode_sampler = 'mean_flow'
  config.sampling.sample_steps = (1, 2)
  return config


def records(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@TARGETS
def test_meanflow_trains_in_the_loop_and_an_interrupted_run_resumes_exactly(tmp_path, target):
  """4 updates in one go equal 2 updates, a restart and 2 more (weights, EMA, Adam, logged losses): the JVP step
  (or SplitMeanFlow's) draws its noise, (t, s) pairs and split points from the saved generator like the
  rectified-flow step."""
  uninterrupted = run_lib.train(meanflow_config(4, target), str(tmp_path / 'a'))
  run_lib.train(meanflow_config(2, target), str(tmp_path / 'b'))
  resumed = run_lib.train(meanflow_config(4, target), str(tmp_path / 'b'))
  expected, actual = flat_state(uninterrupted), flat_state(resumed)
  assert expected.keys() == actual.keys()
  assert all(torch.equal(expected[key], actual[key]) for key in expected)
  assert ([r['training_loss'] for r in records(tmp_path / 'a') if 'training_loss' in r]
          == [r['training_loss'] for r in records(tmp_path / 'b') if 'training_loss' in r])
  run_lib.seed_everything(meanflow_config().seed)
  fresh = flat_state(losses.build_training_state(meanflow_config(), torch.device('cpu')))
  assert not torch.equal(fresh['param.0'], actual['param.0'])  # It trained.
  # The two-time network's interval embedding (zero at initialisation) learned something.
  interval = [p for name, p in resumed['model'].named_parameters() if name.startswith('interval_embedding.1.')]
  assert interval and any(p.abs().sum() > 0 for p in interval)


@TARGETS
def test_the_loop_loss_is_the_library_loss_on_the_global_batch_draws(target):
  """The framework's MeanFlow loss of a global batch of 8 is the library's MeanFlow loss on the noise and (t, s)
  pairs drawn for all 8 rows from the path generator, and two micro-batches of 4 (each slicing those draws) give
  the same per-sample losses, so processes and micro-batches do not change what a sample trains on."""
  config = meanflow_config(target=target)
  torch.manual_seed(0)
  state = losses.build_training_state(config, torch.device('cpu'))
  flow = losses.build_flow(config, state['model'])
  assert isinstance(flow, MeanFlow) and flow.interval_fraction == 0.5 and flow.loss_reduction == 'mean'
  assert isinstance(flow, SplitMeanFlow) == (target == 'split')
  assert isinstance(flow, ImprovedMeanFlow) == (target == 'imf')
  flow.model.train(False)  # No dropout: equal inputs give equal outputs.
  x1 = torch.rand(8, 1, 16, 16) * 2 - 1
  loss_fn = losses.get_loss_fn(config, flow)
  whole = loss_fn(None, x1, generator=torch.Generator().manual_seed(5), global_batch=8)
  halves = [loss_fn(None, x1[rows], generator=torch.Generator().manual_seed(5), global_batch=8, rows=rows)
            for rows in (slice(0, 4), slice(4, 8))]
  torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, rtol=1e-5, atol=1e-7)

  generator = torch.Generator().manual_seed(5)
  noise = torch.randn(x1.shape, generator=generator)
  times = flow.sample_training_times(8, generator=generator)
  assert (times['end_times'] >= times['times']).all() and (times['end_times'] > times['times']).any()
  assert (times['end_times'] == times['times']).any() and ('split_fractions' in times) == (target == 'split')
  torch.testing.assert_close(whole, flow(x1, noise=noise, **times), rtol=1e-6, atol=0)


def test_a_non_finite_meanflow_update_is_skipped_and_counted(tmp_path):
  """A NaN pixel in update 3's batch: the update changes nothing (the state equals that of 2 clean updates), the
  run goes on and counts it."""
  config = meanflow_config(3, snapshot_freq_for_preemption=3)

  def batches_with_nan(start, device, generator):
    for step, batch in enumerate(streams.data_batches(config, start, device, generator), start=start + 1):
      if step == 3:
        x1 = batch.x1.clone()
        x1[0, 0, 0, 0] = float('nan')
        batch = batch._replace(x1=x1)
      yield batch

  state = run_lib.run_training(config, str(tmp_path / 'nan'), train_batches=batches_with_nan,
                               eval_batches=lambda start, device: streams.held_out_data_batches(config, start, device))
  assert state['step'] == 3 and state['nonfinite_steps'] == 1
  clean = run_lib.train(meanflow_config(2, snapshot_freq_for_preemption=2), str(tmp_path / 'clean'))
  expected, actual = flat_state(clean), flat_state(state)
  assert all(torch.equal(expected[key], actual[key]) for key in expected)


@TARGETS
def test_bf16_meanflow_keeps_fp32_state_and_its_first_loss_close_to_fp32(tmp_path, target):
  """Under bf16 autocast the JVP runs in bf16 and the weights, EMA and Adam stay float32; the first update's loss
  (same weights, same draws) is within bf16 round-off of the fp32 one."""
  first_losses = {}
  for precision in ('fp32', 'bf16'):
    config = meanflow_config(2, target)
    config.training.precision = precision
    state = run_lib.train(config, str(tmp_path / precision))
    assert all(p.dtype == torch.float32 for p in state['model'].parameters())
    assert all(s.dtype == torch.float32 for s in state['ema'].shadow_params)
    losses_logged = [r['training_loss'] for r in records(tmp_path / precision) if 'training_loss' in r]
    assert all(torch.isfinite(torch.tensor(losses_logged)))
    first_losses[precision] = losses_logged[0]
  assert first_losses['bf16'] == pytest.approx(first_losses['fp32'], rel=0.02)


def test_the_two_distribution_time_sampler_reaches_the_library_from_the_config():
  config = meanflow_config()
  config.meanflow.time_mean, config.meanflow.time_std = 0.6, 1.6
  flow = losses.build_flow(config, losses.build_training_state(config, torch.device('cpu'))['model'])
  assert flow.end_time_distribution_kwargs == {'mean': 0.6, 'std': 1.6}  # Off: both times from one distribution.
  config.meanflow.separate_end_times = True
  config.meanflow.end_time_mean, config.meanflow.end_time_std = 4.0, 1.5
  flow = losses.build_flow(config, losses.build_training_state(config, torch.device('cpu'))['model'])
  assert flow.time_distribution_kwargs == {'mean': 0.6, 'std': 1.6}
  assert flow.end_time_distribution_kwargs == {'mean': 4.0, 'std': 1.5}


@TARGETS
def test_a_class_conditional_meanflow_trains_guidance_in_and_samples_one_row_per_class(tmp_path, target):
  """Labels with dropout and trained-in guidance (w = 2, kappa = 0.5 where t <= 0.8): the label embedding learns,
  the snapshot grids have a row per digit at 1 and 2 steps, and the eval sweep reports the class agreement."""
  config = meanflow_config(2, target, snapshot_freq=2)
  config.model.num_classes = 10
  config.training.label_dropout = 0.5
  m = config.meanflow
  m.guidance_scale, m.guidance_mix, m.guidance_t_max = 2.0, 0.5, 0.8
  config.sampling.snapshot_batch_size = 20
  flow = losses.build_flow(config, losses.build_training_state(config, torch.device('cpu'))['model'])
  assert flow.guided and flow.guidance_interval == (0.0, 0.8) and flow.label_dropout == 0.5
  initial = {name: p.detach().clone() for name, p in flow.model.net.named_parameters() if 'label_embedding' in name}
  run_lib.seed_everything(config.seed)
  state = run_lib.train(config, str(tmp_path))
  trained = dict(state['model'].named_parameters())
  assert initial and any(not torch.equal(initial[name], trained[name]) for name in initial)
  for steps in (1, 2):
    assert (tmp_path / 'samples' / 'iter_2' / f'sample_{steps}step.png').is_file()
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  config.eval.enable_sampling, config.eval.metrics_backend = True, 'digits'
  config.eval.num_samples, config.eval.batch_size = 20, 10
  reports = run_lib.evaluate(config, str(tmp_path), 'eval')
  assert [r['sample_steps'] for r in reports] == [1, 2]
  assert all('class_accuracy' in r and r['guidance_scale'] == 1.0 for r in reports)


def test_the_mean_flow_sampler_is_the_library_sample_at_k_steps():
  """``sampling.use_ode_sampler='mean_flow'`` with sample_N = k gives ``MeanFlow.sample(steps=k)`` on the same
  noise (k network evaluations)."""
  config = meanflow_config()
  torch.manual_seed(0)
  net = losses.build_training_state(config, torch.device('cpu'))['model'].eval()
  with torch.no_grad():  # Away from the initialisation, whose zero last layers make u nearly constant in t and s.
    for p in net.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  flow = losses.build_flow(config, net)
  noise = torch.randn(3, 1, 16, 16)
  for steps in (1, 2, 3):
    sample_fn = sampling.get_sampling_fn(sampling.with_sample_steps(config, steps), noise.shape)
    solution = sample_fn(flow, noise=noise)
    assert solution.nfe == steps
    # Equal up to the float32 rounding of the grid times (t_i = i / k there, a linspace here), scaled by 999.
    torch.testing.assert_close(solution.x, flow.sample(noise=noise, steps=steps), rtol=1e-4, atol=1e-4)
  one, two = (sampling.get_sampling_fn(sampling.with_sample_steps(config, k), noise.shape)(flow, noise=noise).x
              for k in (1, 2))
  assert (one - two).abs().max() > 1e-3  # The step count matters: the sweep's two rows are different samplers.


def test_the_eval_sweep_samples_at_1_and_2_steps_with_the_digit_fd_of_the_saved_samples(tmp_path):
  """eval.metrics_backend='digits' and sampling.sample_steps=(1, 2): a report, a folder of rounds and a csv row per
  step count; each report's samples are the library's k-step MeanFlow samples of the indexed noise, and its
  digit_fd is the Frechet distance of those saved samples to the digits."""
  config = meanflow_config(2, snapshot_freq=2)
  run_lib.train(config, str(tmp_path))
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  config.eval.enable_sampling, config.eval.enable_loss, config.eval.metrics_backend = True, True, 'digits'
  config.eval.num_samples, config.eval.batch_size = 12, 6
  reports = run_lib.evaluate(config, str(tmp_path), 'eval')
  assert [(r['checkpoint'], r['sample_steps'], r['nfe_mean']) for r in reports] == [(1, 1, 1.0), (1, 2, 2.0)]
  assert reports[0]['eval_loss'] == reports[1]['eval_loss']
  rows = (tmp_path / 'eval' / 'report.csv').read_text().splitlines()
  assert rows[0].endswith(',sample_steps,digit_fd') and len(rows) == 3
  assert [row.split(',')[-2] for row in rows[1:]] == ['1', '2']

  state = losses.build_training_state(config, torch.device('cpu'))
  checkpoints.load_checkpoint(str(tmp_path / 'checkpoints' / 'checkpoint_1.pth'), state, load_optimizer=False)
  flow = losses.build_flow(config, state['model']).eval()
  params = list(state['model'].parameters())
  noise = flow_math.indexed_noise(config.seed, 0, 12, (1, 16, 16))
  real, _, _ = evaluation_digits.real_digits()
  for report in reports:
    folder = tmp_path / 'eval' / f"ckpt_1_{report['sample_steps']}step"
    saved = evaluation.SampleRounds(str(folder), json.loads((folder / 'manifest.json').read_text()))
    images = torch.cat([torch.from_numpy(saved.read(i)['images']) for i in (0, 1)])
    with state['ema'].average_parameters(params):
      expected = flow.sample(noise=noise, steps=report['sample_steps'])
    expected = evaluation.InceptionFeatures.to_uint8(datasets.get_data_inverse_scaler(config)(expected).clamp(0, 1))
    assert (images.int() - expected.int()).abs().max() <= 1  # 8-bit rounding of float round-off.
    model_space = images.float() / 127.5 - 1.0
    assert report['digit_fd'] == pytest.approx(evaluation_digits.frechet_distance_digits(
        evaluation_digits.digit_classifier(), model_space, real), rel=1e-9)


@pytest.mark.parametrize('change, message', [
    ({'model.time_inputs': 1}, r"needs a network of two times.*--config.model.time_inputs=2"),
    ({'training.objective': 'consistency'}, r"Unknown training.objective 'consistency'; valid: \['rectified_flow', "
                                            r"'meanflow'\]"),
    ({'sampling.guidance_scale': 2.0, 'model.num_classes': 10}, r"trained into the network.*guidance_scale=1"),
    ({'sampling.use_ode_sampler': 'rk45'}, r"sample_steps=\(1, 2\) needs a fixed-step sampler"),
    ({'sampling.sample_steps': (1, 1)}, r"distinct step counts"),
    ({'eval.metrics_backend': 'digits', 'data.dataset': 'CIFAR10', 'data.image_size': 32},
     r"metrics_backend='digits' measures the built-in digits"),
    ({'model.fused_norm': True}, r"fused GroupNorm.*--config.model.fused_norm=False.*meanflow.target=split"),
    ({'meanflow.target': 'taylor'}, r"Unknown meanflow.target 'taylor'; valid: \['jvp', 'split', 'imf'\]"),
    ({'meanflow.target': 'split', 'meanflow.split_point': 'half'}, r"Unknown split_point='half'"),
    ({'meanflow.separate_end_times': True, 'meanflow.time_distribution': 'uniform'},
     r"separate_end_times draws the end times from a logit-normal.*time_distribution='logit_normal'"),
])
def test_a_meanflow_config_that_cannot_work_is_a_clear_error(tmp_path, change, message):
  config = meanflow_config(1)
  config.eval.enable_sampling = True
  for key, value in change.items():
    section, name = key.split('.')
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    if 'eval.metrics_backend' in change:
      run_lib.evaluate(config, str(tmp_path), 'eval')
    else:
      run_lib.train(config, str(tmp_path))


def test_a_rectified_flow_cannot_take_the_mean_flow_sampler_nor_meanflow_the_reflow_stages(tmp_path):
  config = tiny_digits_config(n_iters=1, snapshot_freq=1, snapshot_freq_for_preemption=1)
  config.sampling.use_ode_sampler = 'mean_flow'
  with pytest.raises(ValueError, match=r"'mean_flow' jumps with a MeanFlow's average velocity"):
    run_lib.train(config, str(tmp_path / 'rf'))
  config = meanflow_config(1)
  config.reflow.reflow_type = 'train_reflow'
  with pytest.raises(ValueError, match=r"--mode reflow makes and trains rectified flows"):
    run_lib.reflow(config, str(tmp_path / 'reflow'))


def test_set_meanflow_weights_the_split_target_by_the_squared_error_and_the_others_by_the_papers_p():
  from configs.default_cifar10_configs import get_default_configs
  from configs.rectified_flow.cifar10_meanflow import set_meanflow
  powers = {target: set_meanflow(get_default_configs(), target=target).meanflow.adaptive_weight_power
            for target in losses.MEANFLOW_TARGETS}
  assert powers == {'jvp': 0.75, 'split': 0.0, 'imf': 0.75}
  assert set_meanflow(get_default_configs(), target='split', adaptive_weight_power=1.0).meanflow[
      'adaptive_weight_power'] == 1.0
