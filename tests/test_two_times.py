"""Networks of two times (model.time_inputs = 2, MeanFlow's average velocity over [t, s]): the interval length
s - t is embedded beside the time; with time_inputs = 1 the networks are exactly the published ones."""
import pytest
import torch

import checkpoints
import losses
import models
from configs.default_cifar10_configs import get_default_configs
from models import model_registry
from tests.helpers import fixture_config, load_fixture

INTERVAL_KEYS = ['interval_embedding.0.weight', 'interval_embedding.0.bias', 'interval_embedding.1.weight',
                 'interval_embedding.1.bias']


def tiny_config(**model):
  """A DDPM++ of a few thousand parameters on 16x16 images, its blocks' last layers not near zero (init_scale 1, not
  the published 0), so that its outputs at initialisation are of order 1 and a change of input shows."""
  config = get_default_configs()
  config.model.init_scale = 1.0
  config.data.image_size = 16
  config.model.nf = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  for key, value in model.items():
    config.model[key] = value
  return config


def build(config, seed=0):
  torch.manual_seed(seed)
  return models.create_model(config).eval()


def inputs(batch=3, size=16, seed=1):
  generator = torch.Generator().manual_seed(seed)
  x = torch.randn(batch, 3, size, size, generator=generator)
  t = torch.rand(batch, generator=generator)
  return x, t


def randomise_interval_output(net, seed=2):
  """The interval embedding's last layer with random values (it starts at zero)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in net.interval_embedding[1].parameters():
      param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_one_time_network_is_the_network_built_without_the_setting():
  config = tiny_config()
  assert config.model.time_inputs == 1
  kwargs = models.model_kwargs_from_config(config)
  assert kwargs.pop('time_inputs') == 1
  ours = build(config)
  torch.manual_seed(0)
  old = model_registry.get_model_class('ncsnpp')(**kwargs).eval()  # As every network was built before the key.
  assert [name for name, _ in ours.named_modules()] == [name for name, _ in old.named_modules()]
  assert list(ours.state_dict()) == list(old.state_dict())
  for key, value in old.state_dict().items():
    assert torch.equal(ours.state_dict()[key], value), key
  assert not any(key.startswith('interval_embedding') for key in ours.state_dict())
  x, t = inputs()
  with torch.no_grad():
    assert torch.equal(ours(x, t * 999), old(x, t * 999))
    assert torch.equal(models.VelocityField(ours)(x, t), old(x, t * 999))


@pytest.mark.parametrize('name', ['ddpmpp_tiny', 'ncsnpp_tiny'])
def test_one_time_networks_load_and_reproduce_the_published_fixtures(name):
  net, checkpoint, io = load_fixture(name)
  assert net.time_inputs == 1
  assert list(checkpoints.to_published_state_dict(net)) == list(checkpoint['model'])
  checkpoints.load_network_weights(net, checkpoint['model'])
  net.eval()
  with torch.no_grad():
    torch.testing.assert_close(net(io['x'], io['model_input_time']), io['output_model_weights'], atol=1e-5, rtol=0)


def test_two_time_network_adds_only_the_interval_embedding_and_starts_as_the_one_time_network():
  one, two = build(tiny_config()), build(tiny_config(time_inputs=2))
  assert list(two.state_dict()) == list(one.state_dict()) + INTERVAL_KEYS
  for key, value in one.state_dict().items():  # Built from the same seed: the same published weights.
    assert torch.equal(two.state_dict()[key], value), key
  nf = 16
  assert [tuple(two.state_dict()[key].shape) for key in INTERVAL_KEYS] == [
      (nf * 4, nf), (nf * 4,), (nf * 4, nf * 4), (nf * 4,)]
  assert not torch.any(two.interval_embedding[1].weight) and not torch.any(two.interval_embedding[1].bias)
  assert torch.any(two.interval_embedding[0].weight)
  assert not any(module is layer for module in two.all_modules for layer in two.interval_embedding)
  x, t = inputs()
  with torch.no_grad():
    reference = one(x, t * 999)
    for interval in (torch.zeros(3), torch.tensor([1.0, 250.0, 998.0])):  # The zero last layer ignores s - t.
      assert torch.equal(two(x, t * 999, interval_cond=interval), reference)


@pytest.mark.parametrize('overrides', [{}, {'num_classes': 3}, {'embedding_type': 'fourier', 'fir': True}],
                         ids=['ddpmpp', 'conditional', 'fourier'])
def test_two_time_network_output_depends_on_the_interval_and_trains_its_embedding(overrides):
  net = build(tiny_config(time_inputs=2, **overrides))
  labels = {'labels': torch.tensor([0, 2, 3])} if overrides.get('num_classes') else {}
  x, t = inputs()
  time_cond = t * 999 + 1  # > 0 for the log of a 'fourier' network.

  # At initialisation the last layer's gradient already flows (the first layer's is zero until it moves).
  net(x, time_cond, interval_cond=torch.full((3,), 100.0), **labels).square().mean().backward()
  assert torch.any(net.interval_embedding[1].weight.grad)
  assert not torch.any(net.interval_embedding[0].weight.grad)

  randomise_interval_output(net)
  net.zero_grad()
  with torch.no_grad():
    short = net(x, time_cond, interval_cond=torch.zeros(3), **labels)  # s = t: an empty step.
    long = net(x, time_cond, interval_cond=torch.full((3,), 500.0), **labels)
    again = net(x, time_cond, interval_cond=torch.zeros(3), **labels)
  assert torch.isfinite(short).all() and torch.isfinite(long).all()
  assert torch.equal(short, again)
  assert (short - long).abs().amax(dim=(1, 2, 3)).min() > 0.1  # Every sample sees its own interval.
  mixed = net(x, time_cond, interval_cond=torch.tensor([0.0, 500.0, 0.0]), **labels)
  torch.testing.assert_close(mixed[1], long[1], atol=1e-5, rtol=0)
  torch.testing.assert_close(mixed[0], short[0], atol=1e-5, rtol=0)
  mixed.square().mean().backward()
  for name, param in net.interval_embedding.named_parameters():
    assert param.grad is not None and torch.any(param.grad), name


class RecordingNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.calls = []

  def forward(self, *args, **kwargs):
    self.calls.append((args, kwargs))
    return args[0]


def test_velocity_field_passes_the_interval_on_the_network_scale():
  fake = RecordingNet()
  field = models.VelocityField(fake)
  x = torch.randn(2, 3, 4, 4)
  t, s = torch.tensor([0.25, 0.5]), torch.tensor([0.75, 0.5])
  labels = torch.tensor([1, 0])

  field(x, t)
  field(x, t, labels)
  field(x, t, end_times=s)
  field(x, times=t, end_times=s, labels=labels)
  (plain, plain_kwargs), (labelled, labelled_kwargs) = fake.calls[:2]
  assert len(plain) == 2 and not plain_kwargs  # Without end_times: the call of a one-time network, as before.
  torch.testing.assert_close(plain[1], t * 999)
  assert len(labelled) == 3 and labelled[2] is labels and not labelled_kwargs
  for args, kwargs in fake.calls[2:]:
    assert set(kwargs) == {'interval_cond'}
    torch.testing.assert_close(args[1], t * 999, atol=0, rtol=0)
    torch.testing.assert_close(kwargs['interval_cond'], (s - t) * 999, atol=0, rtol=0)
    torch.testing.assert_close(kwargs['interval_cond'], torch.tensor([499.5, 0.0]))
  assert len(fake.calls[2][0]) == 2 and fake.calls[3][0][2] is labels


def test_velocity_field_gives_the_network_the_configured_time_and_interval_scales():
  config = get_default_configs()
  config.model.time_scale, config.model.interval_scale = 1.0, 250.0
  fake = RecordingNet()
  field = losses.velocity_field(config, fake)
  x = torch.randn(2, 3, 4, 4)
  t, s = torch.tensor([0.25, 0.5]), torch.tensor([0.75, 0.5])
  field(x, t, end_times=s)
  args, kwargs = fake.calls[0]
  torch.testing.assert_close(args[1], t, atol=0, rtol=0)
  torch.testing.assert_close(kwargs['interval_cond'], torch.tensor([125.0, 0.0]), atol=0, rtol=0)


def test_a_config_without_the_scale_keys_keeps_the_published_999():
  config = get_default_configs()
  assert models.time_scales(config) == (999.0, 999.0)
  del config.model['time_scale']
  del config.model['interval_scale']  # A config written before the keys existed.
  assert models.time_scales(config) == (999.0, 999.0)
  fake = RecordingNet()
  flow = losses.build_rectified_flow(config, fake)
  t = torch.tensor([0.5, 1.0])
  flow.model(torch.randn(2, 3, 4, 4), t)
  torch.testing.assert_close(fake.calls[0][0][1], t * 999, atol=0, rtol=0)


def test_meanflow_configs_give_the_network_raw_times():
  from configs.rectified_flow import cifar10_meanflow, digits_meanflow_demo
  for config in (cifar10_meanflow.get_config(), digits_meanflow_demo.get_config()):
    assert models.time_scales(config) == (1.0, 1.0)
  from configs.rectified_flow import cifar10_rf_gaussian_ddpmpp
  assert models.time_scales(cifar10_rf_gaussian_ddpmpp.get_config()) == (999.0, 999.0)


def test_velocity_field_of_a_two_time_network():
  net = build(tiny_config(time_inputs=2, num_classes=3))
  randomise_interval_output(net)
  x, t = inputs()
  s = torch.tensor([1.0, 0.9, 0.5]).maximum(t)
  labels = torch.tensor([0, 1, 3])
  with torch.no_grad():
    out = models.VelocityField(net)(x, times=t, end_times=s, labels=labels)
    torch.testing.assert_close(out, net(x, t * 999, labels, interval_cond=(s - t) * 999), atol=0, rtol=0)
    assert not torch.allclose(out, net(x, t * 999, labels, interval_cond=torch.zeros(3)))


def test_wrong_combinations_of_times_are_clear_errors():
  one, two = build(tiny_config()), build(tiny_config(time_inputs=2))
  x, t = inputs()
  with pytest.raises(ValueError, match=r'network of one time: set model\.time_inputs=2'):
    one(x, t * 999, interval_cond=torch.zeros(3))
  with pytest.raises(ValueError, match=r'needs interval_cond=\(s - t\) \* model\.interval_scale.*end_times='):
    two(x, t * 999)
  with pytest.raises(ValueError, match=r'time_inputs=2 needs interval_cond'):
    models.VelocityField(two)(x, t)
  with pytest.raises(ValueError, match=r'network of one time'):
    models.VelocityField(one)(x, t, end_times=torch.ones(3))
  with pytest.raises(ValueError, match=r'interval_cond has shape \(3, 1\); expected \(3,\)'):
    two(x, t * 999, interval_cond=torch.zeros(3, 1))
  with pytest.raises(ValueError, match=r'model\.time_inputs=3: use 1 .* or 2'):
    models.create_model(tiny_config(time_inputs=3))
  with pytest.raises(ValueError, match=r'time_inputs=2 needs model\.conditional=True'):
    models.create_model(tiny_config(time_inputs=2, conditional=False))


def test_summary_and_checkpoint_check_tell_the_two_apart():
  one_config, two_config = tiny_config(), tiny_config(time_inputs=2)
  one_summary, two_summary = models.model_config_summary(one_config), models.model_config_summary(two_config)
  assert one_summary != two_summary
  assert 'time_inputs=1' in one_summary and 'time_inputs=2' in two_summary
  one, two = build(one_config), build(two_config)
  with pytest.raises(ValueError, match=r'Unexpected keys: interval_embedding\.0\.bias.*time_inputs=1') as error:
    checkpoints.load_network_weights(one, checkpoints.to_published_state_dict(two), architecture=one_summary)
  assert 'Missing keys: none' in str(error.value)
  with pytest.raises(ValueError, match=r'Missing keys: interval_embedding\.0\.bias.*time_inputs=2'):
    checkpoints.load_network_weights(two, checkpoints.to_published_state_dict(one), architecture=two_summary)


def test_old_config_files_read_as_one_time_networks():
  config = fixture_config('ddpmpp_tiny')  # Written before the key: with_defaults gives it time_inputs = 1.
  assert config.model.time_inputs == 1 and 'time_inputs=1' in models.model_config_summary(config)


def saved_state(tmp_path, config, name, record_config=True):
  """A checkpoint of ``config``'s tiny network written by the framework (its config recorded, or not, as the
  published files and the framework's earliest ones)."""
  torch.manual_seed(0)
  state = losses.build_training_state(config, torch.device('cpu'))
  path = str(tmp_path / name)
  checkpoints.save_checkpoint(path, state, config if record_config else None)
  return path


def fresh_state(config):
  state = losses.build_training_state(config, torch.device('cpu'))
  for parameter in state['model'].parameters():
    parameter.data.zero_()
  return state


def test_a_checkpoint_loads_only_with_the_time_scales_it_was_trained_with(tmp_path):
  """The checkpoint records the run's config, so a network trained on raw times (MeanFlow's configs) is refused
  under the published 999 and the other way round, with the overrides that fix it, before any weight is restored."""
  raw = tiny_config(time_inputs=2, time_scale=1.0, interval_scale=1.0)
  path = saved_state(tmp_path, raw, 'raw.pth')
  published = tiny_config(time_inputs=2)
  state = fresh_state(published)
  with pytest.raises(ValueError, match=r'model\.time_scale=1, model\.interval_scale=1 .*this config gives 999, 999.*'
                                       r'--config\.model\.time_scale=1 --config\.model\.interval_scale=1'):
    checkpoints.load_checkpoint(path, state, config=published)
  assert all((parameter == 0).all() for parameter in state['model'].parameters())  # Nothing was restored.
  half = tiny_config(time_inputs=2, time_scale=1.0, interval_scale=999.0)
  with pytest.raises(ValueError, match=r"'[^']*raw\.pth' was trained with model\.interval_scale=1 \(") as error:
    checkpoints.load_checkpoint(path, fresh_state(half), config=half)
  assert 'time_scale=1 ' not in str(error.value).split('Pass')[0]  # Only the scale that differs is named.
  state = fresh_state(raw)
  checkpoints.load_checkpoint(path, state, config=raw)
  assert any((parameter != 0).any() for parameter in state['model'].parameters())


def test_checkpoints_without_the_scales_are_the_published_999(tmp_path):
  """No config recorded (the published files) or one from before the keys: trained on t * 999; a one-time network
  is not held to the interval scale it does not use."""
  raw = tiny_config(time_inputs=2, time_scale=1.0, interval_scale=1.0)
  for name, record in (('none.pth', False), ('old.pth', True)):
    config = tiny_config(time_inputs=2)
    if record:
      del config.model['time_scale']
      del config.model['interval_scale']
    path = saved_state(tmp_path, config, name, record_config=record)
    assert checkpoints.recorded_time_scales(torch.load(path, weights_only=True)) == (999.0, 999.0)
    checkpoints.load_checkpoint(path, fresh_state(tiny_config(time_inputs=2)), config=tiny_config(time_inputs=2))
    with pytest.raises(ValueError, match=r'--config\.model\.time_scale=999 --config\.model\.interval_scale=999'):
      checkpoints.load_checkpoint(path, fresh_state(raw), config=raw)
  one_time = tiny_config(interval_scale=1.0)
  checkpoints.load_checkpoint(saved_state(tmp_path, tiny_config(), 'one.pth'), fresh_state(one_time), config=one_time)


def test_resuming_or_evaluating_a_run_with_other_time_scales_is_a_clear_error(tmp_path):
  """The loop and the eval sweep pass their config: a MeanFlow workdir trained on raw times cannot be resumed or
  swept under the published 999 by mistake."""
  import run_lib
  from tests.helpers import tiny_digits_config
  config = tiny_digits_config(n_iters=1, snapshot_freq=1)
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  config.training.objective = 'meanflow'
  config.model.time_inputs = 2
  config.model.time_scale = config.model.interval_scale = 1.0
  config.sampling.use_ode_sampler = 'mean_flow'
  run_lib.train(config, str(tmp_path))
  config.model.time_scale = config.model.interval_scale = 999.0
  config.training.n_iters = 2
  with pytest.raises(ValueError, match=r'--config\.model\.time_scale=1 --config\.model\.interval_scale=1'):
    run_lib.train(config, str(tmp_path))
  with pytest.raises(ValueError, match=r'--config\.model\.time_scale=1 --config\.model\.interval_scale=1'):
    run_lib.evaluate(config, str(tmp_path), 'eval')
