"""The framework's training step reproduces the published one (``official_fixtures/ddpmpp_tiny_train.pt``).

The fixture holds 6 updates of the published training code on the tiny DDPM++: initial weights, each update's
batch, noise, times, loss and learning rate, and the checkpoint after the last update. The updates here run through
the step function that ``run_lib.run_training`` uses (``losses.get_step_fn`` around ``losses.get_loss_fn``); the
only seam is ``times_fn``, which hands the loss the fixture's times instead of drawing them, and the noise enters
as the batch's x0, as reflow pairs do.
"""
import numpy as np
import pytest
import torch

import checkpoints
import losses
import models
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as cifar10_config
from datasets import Batch
from tests.reference_data import reference_path

# What the fixture's numpy scalars (the optimiser's lr, as the published code saved it) need, and nothing else.
FIXTURE_GLOBALS = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]


@pytest.fixture(scope='module')
def fixture():
  with torch.serialization.safe_globals(FIXTURE_GLOBALS):
    return torch.load(reference_path('official_fixtures', 'ddpmpp_tiny_train.pt'), map_location='cpu',
                      weights_only=True)


def fixture_training_config(fixture, fused):
  """The published CIFAR-10 config with the fixture's model, optimiser and batch (CPU, fp32)."""
  spec = fixture['config']
  config = cifar10_config()
  config.device = 'cpu'
  config.training.precision = 'fp32'
  config.training.batch_size = fixture['batches'][0].shape[0]
  config.data.image_size, config.data.num_channels = spec['image_size'], spec['num_channels']
  for key in ('nf', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'dropout', 'ema_rate', 'resblock_type',
              'attention_type', 'embedding_type', 'init_scale', 'skip_rescale', 'conv_size', 'fir', 'fir_kernel',
              'progressive', 'progressive_input', 'progressive_combine', 'resamp_with_conv', 'scale_by_sigma',
              'nonlinearity', 'normalization', 'fourier_scale', 'sigma_min', 'sigma_max', 'num_scales', 'name'):
    config.model[key] = type(config.model[key])(spec['model'][key]) if isinstance(
        config.model[key], (tuple, list)) else spec['model'][key]
  for key in ('lr', 'warmup', 'grad_clip', 'beta1', 'eps', 'weight_decay'):
    config.optim[key] = spec['optim'][key]
  config.optim.fused = fused
  return config


def replay(fixture, config):
  """Runs the fixture's updates through the framework's step; returns (state, losses)."""
  device = torch.device('cpu')
  state = losses.build_training_state(config, device)
  checkpoints.load_network_weights(state['model'], fixture['init_model'])
  state['ema'] = models.ExponentialMovingAverage(state['model'].parameters(), decay=config.model.ema_rate)
  times = {}
  flow = losses.build_rectified_flow(config, state['model'])
  loss_fn = losses.get_loss_fn(config, flow, times_fn=lambda size, device, generator: times['now'])
  params = [p for p in state['model'].parameters() if p.requires_grad]
  step = losses.get_step_fn(config, loss_fn, params, state['optimizer'], state['ema'], train=True, device=device)
  seen = []
  for batch, noise, t in zip(fixture['batches'], fixture['z0'], fixture['t']):
    times['now'] = t
    seen.append(float(step(state, [Batch(noise, batch, slice(None))])))
  return state, seen


@pytest.mark.parametrize('fused', [False, True], ids=['published_unfused_adam', 'default_fused_adam'])
def test_the_training_step_reproduces_the_published_updates(fixture, fused):
  config = fixture_training_config(fixture, fused)
  assert [losses.learning_rate(config, step) for step in range(len(fixture['lr']))] == pytest.approx(
      fixture['lr'], abs=1e-12)
  state, seen = replay(fixture, config)
  assert seen == pytest.approx(fixture['loss'], rel=1e-6, abs=0)

  final = fixture['final_checkpoint']
  assert state['step'] == final['step'] == len(fixture['loss'])
  weights = checkpoints.to_published_state_dict(state['model'])
  assert weights.keys() == final['model'].keys()
  for key, value in final['model'].items():
    torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)
  ema = state['ema'].state_dict()
  assert ema['num_updates'] == final['ema']['num_updates'] and ema['decay'] == final['ema']['decay']
  for ours, published in zip(ema['shadow_params'], final['ema']['shadow_params'], strict=True):
    torch.testing.assert_close(ours, published, rtol=1e-5, atol=1e-6)
  ours, published = state['optimizer'].state_dict()['state'], final['optimizer']['state']
  assert ours.keys() == published.keys()
  for moment in ('exp_avg', 'exp_avg_sq'):
    # Round-off is relative to the moment's scale over all parameters: some tensors' gradients are round-off alone.
    scale = max(float(published[index][moment].abs().max()) for index in published)
    for index in published:
      assert float(ours[index]['step']) == float(published[index]['step'])
      torch.testing.assert_close(ours[index][moment], published[index][moment], rtol=1e-5, atol=1e-6 * scale)
