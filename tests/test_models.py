"""DDPM++ loads the published checkpoints strictly and reproduces their outputs."""
import pytest
import torch

import checkpoints
import models
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as cifar10_config
from models import model_registry
from tests.helpers import fixture_config, load_fixture
from tests.reference_data import reference_path


def read_key_table(name):
  """{key: (shape, dtype)} of a published state_dict, from the reference TSV."""
  table = {}
  with open(reference_path(name)) as handle:
    for line in handle:
      if line.startswith('#') or not line.strip():
        continue
      key, shape, dtype = line.rstrip('\n').split('\t')
      table[key] = (shape, dtype)
  return table


def test_full_size_cifar10_ddpmpp_has_the_published_state_dict():
  net = models.create_model(cifar10_config())
  expected = read_key_table('cifar10_ddpmpp_state_dict_keys.tsv')
  ours = {key: (str(tuple(value.shape)), str(value.dtype).replace('torch.', ''))
          for key, value in checkpoints.to_published_state_dict(net).items()}
  assert list(ours) == list(expected)
  assert ours == expected
  assert sum(p.numel() for p in net.parameters()) == 61_804_419
  assert all(p.requires_grad for p in net.parameters())


@pytest.fixture(scope='module')
def tiny_ddpmpp():
  return load_fixture('ddpmpp_tiny')


def test_full_size_celeba_hq_ncsnpp_has_the_published_state_dict():
  config = fixture_config('ncsnpp_tiny')
  config.data.image_size = 256
  config.model.nf = 128
  config.model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
  config.model.num_res_blocks = 2
  expected = read_key_table('celeba_hq_ncsnpp_state_dict_keys.tsv')
  net = models.create_model(config)
  ours = {key: (str(tuple(value.shape)), str(value.dtype).replace('torch.', ''))
          for key, value in checkpoints.to_published_state_dict(net).items()}
  assert list(ours) == list(expected) and ours == expected
  assert sum(p.numel() for p in net.parameters()) == 65_574_549
  assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 65_574_421


@pytest.mark.parametrize('name', ['ddpmpp_tiny', 'ncsnpp_tiny'])
def test_tiny_models_reproduce_the_published_outputs(name):
  net, checkpoint, io = load_fixture(name)
  checkpoints.load_network_weights(net, checkpoint['model'])
  net.eval()
  with torch.no_grad():
    out = net(io['x'], io['model_input_time'])
  torch.testing.assert_close(out, io['output_model_weights'], atol=1e-5, rtol=0)

  ema = models.ExponentialMovingAverage(net.parameters(), decay=0.5)
  ema.load_state_dict(checkpoint['ema'])
  with ema.average_parameters(net.parameters()), torch.no_grad():
    out_ema = net(io['x'], io['model_input_time'])
  torch.testing.assert_close(out_ema, io['output_ema_weights'], atol=1e-5, rtol=0)
  assert not torch.allclose(out, out_ema, atol=1e-5)  # The two weight sets really differ.


@pytest.mark.parametrize('progressive,progressive_input,combine', [
    ('residual', 'residual', 'sum'), ('output_skip', 'input_skip', 'cat'), ('none', 'residual', 'sum')])
def test_other_progressive_variants_build_run_and_train(progressive, progressive_input, combine):
  config = fixture_config('ncsnpp_tiny')
  config.model.progressive = progressive
  config.model.progressive_input = progressive_input
  config.model.progressive_combine = combine
  net = models.create_model(config)
  x = torch.randn(2, 3, 32, 32)
  out = net(x, torch.tensor([1.0, 500.0]))
  assert out.shape == x.shape and torch.isfinite(out).all()
  out.square().mean().backward()
  assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_velocity_field_applies_the_network_time_scale(tiny_ddpmpp):
  net, checkpoint, io = tiny_ddpmpp
  checkpoints.load_network_weights(net, checkpoint['model'])
  net.eval()
  torch.testing.assert_close(io['model_input_time'], io['t'] * 999)
  with torch.no_grad():
    out = models.VelocityField(net)(io['x'], io['t'])
  torch.testing.assert_close(out, io['output_model_weights'], atol=1e-5, rtol=0)


def test_checkpoint_from_another_architecture_is_a_clear_error(tiny_ddpmpp):
  _, checkpoint, _ = tiny_ddpmpp
  config = fixture_config('ddpmpp_tiny')
  config.model.num_res_blocks = 2
  other = models.create_model(config)
  with pytest.raises(ValueError, match='Missing keys: .*all_modules') as error:
    checkpoints.load_network_weights(other, checkpoint['model'], source='tiny.pth')
  assert 'tiny.pth' in str(error.value) and 'Unexpected keys' in str(error.value)


def test_unknown_model_name_lists_the_registered_ones():
  with pytest.raises(ValueError, match=r"Unknown model.name 'unet'.*'ncsnpp'"):
    model_registry.get_model_class('unet')


def test_ema_follows_the_published_decay_schedule():
  param = torch.nn.Parameter(torch.zeros(3))
  ema = models.ExponentialMovingAverage([param], decay=0.999)
  shadow = torch.zeros(3)
  for n in range(1, 6):
    with torch.no_grad():
      param.fill_(float(n))
    ema.update([param])
    decay = min(0.999, (1 + n) / (10 + n))
    shadow = decay * shadow + (1 - decay) * n
    torch.testing.assert_close(ema.shadow_params[0], shadow)
  assert ema.state_dict()['num_updates'] == 5
