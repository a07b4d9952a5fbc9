"""The DiT backbone (model.name = 'dit'; Peebles & Xie 2023): the patch layout, adaLN-Zero's start (zero output,
blocks as the identity), its conditioning on time, label and interval, the published sizes, attention by
scaled_dot_product_attention (also under MeanFlow's forward-mode derivative), the config plumbing and its errors, and
training, sampling and resuming in the framework's one loop, and every other mode on it: the eval sweep at 1 and 2
steps, reflow pairs, 2-RF, distillation, 2-RF++, MeanFlow and guided class-conditional sampling."""
import inspect
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

import checkpoints
import datasets
import evaluation
import evaluation_digits
import losses
import models
import reflow
import run_lib
import sampling
from configs.default_cifar10_configs import get_default_configs
from configs.rectified_flow.digits_dit_demo import get_config as digits_dit_config
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_ddpmpp_config
from datasets import reflow_pairs
from models import dit
from models.ncsnpp import NCSNpp
from rectified_flow_pytorch import MeanFlow, RectifiedFlow, flow_math
from tests.helpers import flat_state, tiny_digits_config

DIT_KEYS = ('name', 'patch_size', 'dit_size', 'dit_depth', 'dit_hidden_size', 'dit_num_heads')


def tiny_dit(seed=0, **overrides):
  """A DiT of 2 blocks of width 32 (2 heads) on 3 x 16 x 16 images in 4 x 4 patches, built from ``seed``."""
  kwargs = dict(image_size=16, num_channels=3, centered=True, patch_size=4, depth=2, hidden_size=32, num_heads=2,
                dropout=0.0)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  return dit.DiT(**kwargs).eval()


def perturb(net, seed=1, scale=0.1):
  """Adds N(0, scale^2) noise to every parameter, so that adaLN-Zero's zero layers (and so the output) move off 0."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in net.parameters():
      param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
  return net


def inputs(batch=3, channels=3, size=16, seed=2):
  """Images (B, C, H, W) and network times (B,) on the scale t * 999."""
  generator = torch.Generator().manual_seed(seed)
  return torch.randn(batch, channels, size, size, generator=generator), torch.rand(batch, generator=generator) * 999


def differs_per_sample(a, b, threshold=1e-3):
  """Whether every sample of two (B, ...) outputs differs by more than ``threshold`` somewhere."""
  return bool((a - b).abs().flatten(1).amax(dim=1).min() > threshold)


# ---------------------------------------------------------------------------------------------------------------
# The network.

@pytest.mark.parametrize('patch_size', [2, 4, 8])
def test_the_output_has_the_input_shape_for_each_patch_size(patch_size):
  net = perturb(tiny_dit(patch_size=patch_size))
  assert net.position_embedding.shape == ((16 // patch_size) ** 2, 32)  # (T, D)
  x, time = inputs()
  with torch.no_grad():
    output = net(x, time)
  assert output.shape == x.shape and torch.isfinite(output).all() and output.abs().max() > 0


@pytest.mark.parametrize('patch_size', [2, 4])
def test_unpatchify_puts_every_value_back_at_its_patch(patch_size):
  """Tokens that list each patch's pixels as (row in patch, column in patch, channel), the order of the final
  layer's outputs, are unpatchified into the image they came from."""
  channels, p = 3, patch_size
  lister = torch.zeros(p * p * channels, channels, p, p)  # A convolution whose output o is pixel (c, i, j) of a patch.
  for i in range(p):
    for j in range(p):
      for c in range(channels):
        lister[(i * p + j) * channels + c, c, i, j] = 1.0
  x, _ = inputs()
  tokens = F.conv2d(x, lister, stride=p).flatten(2).transpose(1, 2)  # (B, T, p * p * C); token i: patch (i // g, i % g)
  assert torch.equal(tiny_dit(patch_size=p).unpatchify(tokens), x)


def test_without_blocks_each_output_patch_sees_only_its_input_patch():
  """With no transformer block (nothing mixes tokens), changing one pixel changes exactly the output patch that holds
  it: patchify, the position embedding and unpatchify agree on where each patch lies."""
  net = perturb(tiny_dit(depth=0, patch_size=4))
  x, time = inputs()
  changed = x.clone()
  changed[:, 1, 5, 9] += 1.0  # In the patch of rows 4-7 and columns 8-11.
  with torch.no_grad():
    difference = (net(changed, time) - net(x, time)).abs().amax(dim=(0, 1))  # (H, W)
  inside = torch.zeros(16, 16, dtype=torch.bool)
  inside[4:8, 8:12] = True
  assert (difference[inside] > 0).all() and not difference[~inside].any()


def test_a_fresh_network_outputs_zero_and_starts_each_block_as_the_identity():
  """adaLN-Zero: every block's modulation and the final layer start at zero, so every block maps its tokens to
  themselves and the output is exactly 0 for any input; the final layer's gradient is not zero, so it learns."""
  net = tiny_dit(num_classes=3, time_inputs=2)
  x, time = inputs()
  labels, interval = torch.tensor([0, 2, 3]), torch.tensor([0.0, 10.0, 500.0])
  output = net(x, time, labels, interval_cond=interval)
  assert torch.equal(output, torch.zeros_like(x))
  conditioning = torch.randn(3, 32)
  tokens = torch.randn(3, 16, 32)
  for block in net.blocks:
    assert torch.equal(block(tokens, conditioning), tokens)
  (output - x).square().mean().backward()
  assert net.final_layer.linear.weight.grad.abs().sum() > 0


def test_the_output_depends_on_time_label_and_interval():
  net = perturb(tiny_dit(num_classes=3, time_inputs=2))
  x, time = inputs()
  labels, interval = torch.tensor([0, 1, 2]), torch.tensor([0.0, 100.0, 400.0])
  with torch.no_grad():
    reference = net(x, time, labels, interval_cond=interval)
    assert torch.equal(net(x, time, labels, interval_cond=interval), reference)
    assert differs_per_sample(net(x, time + 50.0, labels, interval_cond=interval), reference)
    assert differs_per_sample(net(x, time, (labels + 1) % 3, interval_cond=interval), reference)
    assert differs_per_sample(net(x, time, labels, interval_cond=interval + 300.0), reference)
    null = torch.full((3,), 3)  # The null label is num_classes, also the default.
    assert torch.equal(net(x, time, interval_cond=interval), net(x, time, null, interval_cond=interval))


@pytest.mark.parametrize('num_classes', [0, 3])
def test_a_fresh_two_time_network_is_the_one_time_network_at_every_interval(num_classes):
  one, two = tiny_dit(num_classes=num_classes), tiny_dit(num_classes=num_classes, time_inputs=2)
  interval_keys = [key for key in two.state_dict() if key.startswith('interval_embedding.')]
  assert interval_keys and list(two.state_dict()) == list(one.state_dict()) + interval_keys
  for key, value in one.state_dict().items():  # Built from the same seed: the same parameters.
    assert torch.equal(two.state_dict()[key], value), key

  perturb(one)  # Away from the zero output, the same weights in both; the interval embedding's last layer stays 0.
  assert two.load_state_dict(one.state_dict(), strict=False).missing_keys == interval_keys
  x, time = inputs()
  labels = {'labels': torch.tensor([0, 1, 3])} if num_classes else {}
  with torch.no_grad():
    reference = one(x, time, **labels)
    for interval in (torch.zeros(3), torch.tensor([1.0, 250.0, 998.0])):
      assert torch.equal(two(x, time, interval_cond=interval, **labels), reference)
    for param in two.interval_embedding.mlp[2].parameters():  # Its last layer, once it has learned something.
      param.normal_(std=0.5)
    assert differs_per_sample(two(x, time, interval_cond=torch.full((3,), 500.0), **labels), reference)


def test_conditioning_inputs_the_network_was_not_built_for_are_clear_errors():
  x, time = inputs()
  with pytest.raises(ValueError, match='labels were given to an unconditional network'):
    tiny_dit()(x, time, torch.tensor([0, 1, 2]))
  with pytest.raises(ValueError, match='interval_cond was given to a network of one time'):
    tiny_dit()(x, time, interval_cond=torch.zeros(3))
  with pytest.raises(ValueError, match=r'time_inputs=2 needs interval_cond=\(s - t\) \* model\.interval_scale'):
    tiny_dit(time_inputs=2)(x, time)
  with pytest.raises(ValueError, match=r'interval_cond has shape \(3, 1\); expected \(3,\)'):
    tiny_dit(time_inputs=2)(x, time, interval_cond=torch.zeros(3, 1))


def test_sdpa_computes_the_attention_once_per_block(monkeypatch):
  calls = []

  def counting_sdpa(*args, **kwargs):
    calls.append(args[0].shape)
    return original(*args, **kwargs)

  original = F.scaled_dot_product_attention
  monkeypatch.setattr(F, 'scaled_dot_product_attention', counting_sdpa)
  net = perturb(tiny_dit(depth=3))
  x, time = inputs()
  with torch.no_grad():
    net(x, time)
  assert calls == [(3, 2, 16, 16)] * 3  # (B, heads, T, D / heads) in each of the 3 blocks.


def test_the_forward_mode_derivative_through_sdpa_is_the_finite_difference():
  """Dual numbers (MeanFlow's JVP) run through the attention (the CPU flash kernel has no forward derivative; the math
  kernel is chosen) and give the central difference of the float64 network: along an image direction to round-off,
  and along MeanFlow's (v, 1) to the difference's own error (the time's sinusoids are float32, so its step is 0.01)."""
  net = perturb(tiny_dit(time_inputs=2)).double()
  x, time = inputs()
  x, time, interval = x.double(), time.double(), torch.tensor([5.0, 50.0, 500.0], dtype=torch.float64)
  direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
  for time_direction, step, tolerance in ((0.0, 1e-5, 1e-8), (1.0, 1e-2, 1e-3)):
    time_tangent = torch.full_like(time, time_direction)
    with torch.no_grad():
      with forward_ad.dual_level():
        output = net(forward_ad.make_dual(x, direction), forward_ad.make_dual(time, time_tangent),
                     interval_cond=interval)
        value, derivative = forward_ad.unpack_dual(output)
      torch.testing.assert_close(value, net(x, time, interval_cond=interval), rtol=1e-12, atol=1e-12)  # Other kernel.
      ahead = net(x + step * direction, time + step * time_tangent, interval_cond=interval)
      behind = net(x - step * direction, time - step * time_tangent, interval_cond=interval)
    scale = derivative.abs().max()
    assert scale > 0.1
    assert ((ahead - behind) / (2 * step) - derivative).abs().max() < tolerance * scale


def test_the_benchmarks_count_the_cpus_attention_flops_as_the_gpus_kernels():
  """benchmarks/timing.count_cpu_attention_flops: scaled_dot_product_attention on the CPU counts 2 matmuls of
  2 B H T^2 D FLOPs forward and 5 backward (the scores recomputed, then 4 gradient matmuls), as torch counts its GPU
  kernels."""
  from torch.utils.flop_counter import FlopCounterMode

  from benchmarks.timing import count_cpu_attention_flops

  count_cpu_attention_flops()
  count_cpu_attention_flops()  # A second call changes nothing.
  batch, heads, tokens, width = 2, 3, 16, 8
  q, k, v = (torch.randn(batch, heads, tokens, width, requires_grad=True) for _ in range(3))
  with FlopCounterMode(display=False) as counter:
    out = F.scaled_dot_product_attention(q, k, v)
  assert counter.get_total_flops() == 4 * batch * heads * tokens ** 2 * width
  with FlopCounterMode(display=False) as counter:
    out.sum().backward()
  assert counter.get_total_flops() == 10 * batch * heads * tokens ** 2 * width


def test_the_published_sizes_and_parameter_counts():
  """DiT-S, B, L, XL: depth, width and heads of Table 1 of Peebles & Xie 2023, and with 2 x 2 patches of the
  32 x 32 x 4 latents of ImageNet 256 and its 1000 classes their published parameter counts 33M, 130M, 458M and 675M
  (built on the meta device: shapes only; ours predict 4 channels where DiT also predicts 4 variances)."""
  expected = {'S': (12, 384, 6, 33e6), 'B': (12, 768, 12, 130e6), 'L': (24, 1024, 16, 458e6),
              'XL': (28, 1152, 16, 675e6)}
  config = get_default_configs()
  config.model.name, config.model.num_classes = 'dit', 1000
  config.data.image_size, config.data.num_channels = 32, 4
  for size, (depth, width, heads, parameters) in expected.items():
    config.model.dit_size = size
    kwargs = models.model_kwargs_from_config(config)
    assert (kwargs['depth'], kwargs['hidden_size'], kwargs['num_heads'], kwargs['patch_size']) == (depth, width,
                                                                                                   heads, 2)
    with torch.device('meta'):
      net = dit.DiT(**kwargs)
    assert len(net.blocks) == depth and net.blocks[0].attention.num_heads == heads
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(parameters, rel=0.01)


def test_the_cifar10_dit_config_is_u_vit_s2s_size_and_training_on_a_dit():
  """configs/rectified_flow/cifar10_dit.py: 13 blocks of width 512 with 8 heads on 2 x 2 patches of CIFAR-10 (256
  tokens), as many parameters as the CIFAR-10 DDPM++ to 1%, and U-ViT's AdamW settings."""
  from configs.rectified_flow.cifar10_dit import get_config as cifar10_dit_config
  from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as cifar10_ddpmpp_config

  config = cifar10_dit_config()
  with torch.device('meta'):
    net, ddpmpp = models.create_model(config), models.create_model(cifar10_ddpmpp_config())
  assert isinstance(net, dit.DiT) and len(net.blocks) == 13 and net.position_embedding.shape == (256, 512)
  assert net.blocks[0].attention.num_heads == 8
  count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
  assert count(net) == pytest.approx(count(ddpmpp), rel=0.01)
  o = config.optim
  assert (o.optimizer, o.lr, o.beta1, o.weight_decay, o.warmup, config.training.batch_size) == (
      'AdamW', 4e-4, 0.99, 0.03, 2500, 512)


# ---------------------------------------------------------------------------------------------------------------
# The config plumbing.

def test_the_digits_demo_builds_a_dit_of_about_the_demo_ddpmpps_size():
  config = digits_dit_config()
  net = models.create_model(config)
  assert isinstance(net, dit.DiT) and len(net.blocks) == 4 and net.position_embedding.shape == (64, 128)
  ddpmpp = models.create_model(digits_ddpmpp_config())
  count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
  assert count(net) == pytest.approx(count(ddpmpp), rel=0.05)
  summary = models.model_config_summary(config)
  assert summary.startswith('model.name=dit, ') and 'patch_size=2, depth=4, hidden_size=128, num_heads=4' in summary
  x = torch.rand(2, 1, 16, 16)
  with torch.no_grad():
    assert models.VelocityField(net)(x, torch.rand(2)).shape == x.shape


def test_every_registered_model_has_its_keyword_arguments_and_ddpmpp_keeps_its_own():
  assert 'dit' in models.registered_models()
  assert sorted(models.KWARGS_FROM_CONFIG) == models.registered_models()
  config = digits_ddpmpp_config()
  kwargs = models.model_kwargs_from_config(config)
  assert list(kwargs) == list(inspect.signature(NCSNpp).parameters)  # As before the DiT: checkpoints record them.
  assert not {'patch_size', 'depth', 'hidden_size', 'num_heads'} & set(kwargs)


def test_the_data_settings_reach_the_network():
  """data.num_channels and image_size shape it; data.centered = False maps [0, 1] inputs to [-1, 1] first."""
  config = digits_dit_config()
  config.data.num_channels, config.data.image_size, config.model.patch_size = 3, 8, 4
  net = perturb(models.create_model(config)).eval()
  assert net.position_embedding.shape == (4, 128)
  config.data.centered = False
  uncentered = models.create_model(config).eval()
  uncentered.load_state_dict(net.state_dict())
  x = torch.rand(2, 3, 8, 8)
  with torch.no_grad():
    torch.testing.assert_close(uncentered(x, torch.tensor([3.0, 700.0])), net(2 * x - 1, torch.tensor([3.0, 700.0])))


@pytest.mark.parametrize('overrides, message', [
    ({'dit_size': 'M'}, r"Unknown model.dit_size 'M'; valid: \['B', 'L', 'S', 'XL'\] or 'custom'"),
    ({'patch_size': 3}, r'model.patch_size=3 must divide data.image_size=16; valid: \[1, 2, 4, 8, 16\]'),
    ({'dit_size': 'S', 'dit_depth': 0, 'dit_hidden_size': 256, 'dit_num_heads': 0}, "leave model.dit_depth"),
    ({'dit_depth': 0}, r"'custom' needs model.dit_depth, model.dit_hidden_size and model.dit_num_heads > 0"),
    ({'dit_num_heads': 3}, 'model.dit_hidden_size=128 must be a multiple of model.dit_num_heads=3'),
    ({'dit_hidden_size': 6, 'dit_num_heads': 2}, 'a multiple of 4 and at least 8'),
    ({'fused_norm': True}, 'set --config.model.fused_norm=False'),
    ({'time_inputs': 3}, r'model.time_inputs=3: use 1'),
], ids=['unknown size', 'patch size', 'size and width', 'custom without depth', 'heads', 'width', 'fused norm',
        'times'])
def test_a_dit_config_that_cannot_be_built_is_a_clear_error(overrides, message):
  config = digits_dit_config()
  for key, value in overrides.items():
    config.model[key] = value
  with pytest.raises(ValueError, match=message):
    models.create_model(config)


# ---------------------------------------------------------------------------------------------------------------
# In the framework: training, sampling, resuming.

def tiny_dit_config(**training):
  """The digits DiT demo's network with the settings of ``tiny_digits_config`` (CPU, fp32, batch 8, dropout 0.1,
  random flips, 2-step Euler grids)."""
  config = tiny_digits_config(**training)
  demo = digits_dit_config().model
  for key in DIT_KEYS:
    config.model[key] = demo[key]
  return config


def meanflow(config):
  config.training.objective = 'meanflow'
  config.model.time_inputs = 2
  config.meanflow.interval_fraction = 0.5
  config.sampling.use_ode_sampler = 'mean_flow'
  return config


def class_conditional(config):
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.guidance_scale = 2.0
  config.sampling.snapshot_batch_size = 10  # A row per digit.
  return config


VARIANTS = {'rectified_flow': (lambda config: config, RectifiedFlow), 'meanflow': (meanflow, MeanFlow),
            'class_conditional': (class_conditional, RectifiedFlow)}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_run_lib_trains_the_dit_and_samples_its_snapshot_grid(variant, tmp_path):
  """4 updates of the one loop on the DiT: the flow is built around it, the losses are finite, the snapshot's sample
  grid (guided, for the class-conditional flow) is written, and the parameters learn from the output back, as
  adaLN-Zero lets them: update 1 has the warm-up's learning rate 0, update 2 moves only the final linear map (every
  other gradient passes a zero layer), update 3 the modulations, and update 4 the attention, the MLPs and the
  embeddings of time, label and interval (its last layer)."""
  configure, flow_class = VARIANTS[variant]
  config = configure(tiny_dit_config(n_iters=4, snapshot_freq=4, snapshot_freq_for_preemption=4))
  flow = losses.build_flow(config, models.create_model(config))
  assert isinstance(flow, flow_class) and isinstance(flow.model.net, dit.DiT)
  run_lib.seed_everything(config.seed)
  fresh = dict(losses.build_training_state(config, torch.device('cpu'))['model'].named_parameters())
  state = run_lib.train(config, str(tmp_path))
  assert state['step'] == 4
  trained = dict(state['model'].named_parameters())
  learned = {name for name in fresh if not torch.equal(fresh[name], trained[name])}
  expected = {'final_layer.linear.weight', 'final_layer.modulation.1.weight', 'blocks.0.modulation.1.bias',
              'blocks.3.attention.qkv.weight', 'blocks.3.mlp.0.weight', 'time_embedding.mlp.2.weight',
              'patch_embedding.weight'}
  expected |= {'meanflow': {'interval_embedding.mlp.2.weight'}, 'class_conditional': {'label_embedding.weight'}}.get(
      variant, set())
  assert expected <= learned, expected - learned
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  logged = [record['training_loss'] for record in records if 'training_loss' in record]
  assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged)))
  assert (tmp_path / 'samples' / 'iter_4' / 'sample.png').is_file()


def test_an_interrupted_dit_run_resumes_exactly_and_another_size_is_refused(tmp_path):
  """4 updates in one go equal 2, a restart from the checkpoint and 2 more (weights, EMA, Adam; dropout and flips
  draw from the saved RNG state); resuming with another DiT width is an error that names both architectures."""
  def config(n_iters):
    return tiny_dit_config(n_iters=n_iters, snapshot_freq=100, snapshot_freq_for_preemption=2)

  uninterrupted = run_lib.train(config(4), str(tmp_path / 'a'))
  run_lib.train(config(2), str(tmp_path / 'b'))
  resumed = run_lib.train(config(4), str(tmp_path / 'b'))
  expected, actual = flat_state(uninterrupted), flat_state(resumed)
  assert expected.keys() == actual.keys()
  assert all(torch.equal(expected[key], actual[key]) for key in expected)

  wider = config(4)
  wider.model.dit_hidden_size = 64
  state = losses.build_training_state(wider, torch.device('cpu'))
  with pytest.raises(ValueError, match='hidden_size=64') as error:
    checkpoints.load_checkpoint(str(tmp_path / 'b' / 'checkpoints-meta' / 'checkpoint_4.pth'), state,
                                architecture=models.model_config_summary(wider))
  assert 'blocks.0.attention.out.bias: (128,) in file, (64,) in model' in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Every other mode on the DiT: the eval sweep, pairs, 2-RF, distillation, 2-RF++, MeanFlow at 1 and 2 steps, guidance.

def fast_learner(config):
  """A learning rate large enough, and an EMA short enough, that 4 updates give a velocity which varies with the
  image and the time, so that a 1-step and a 2-step sample differ."""
  config.optim.lr, config.optim.warmup, config.model.ema_rate = 3e-3, 0, 0.5
  return config


@pytest.fixture(scope='module')
def dit_teacher(tmp_path_factory):
  """The snapshot after 4 updates of the tiny DiT, where every parameter has moved (see above), so that its output
  depends on the image and the time; read, never written."""
  workdir = tmp_path_factory.mktemp('dit_teacher')
  run_lib.train(fast_learner(tiny_dit_config(n_iters=4, snapshot_freq=4, snapshot_freq_for_preemption=4)),
                str(workdir))
  return workdir / 'checkpoints' / 'checkpoint_1.pth'


def dit_reflow_config(teacher, data_root, **reflow):
  config = tiny_dit_config(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=1)
  r = config.reflow
  r.last_flow_ckpt, r.data_root, r.total_number_of_samples, r.pairs_per_shard = str(teacher), str(data_root), 10, 4
  config.sampling.sample_N = 3
  for key, value in reflow.items():
    r[key] = value
  return config


def digits_sweep(config, workdir, num_samples=12):
  """``--mode eval`` of checkpoint 1 with the digits' Frechet distance (no Inception, no download)."""
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  config.eval.enable_sampling, config.eval.enable_loss, config.eval.metrics_backend = True, True, 'digits'
  config.eval.num_samples, config.eval.batch_size = num_samples, 6
  return run_lib.evaluate(config, str(workdir), 'eval')


def saved_samples(folder, rounds):
  saved = evaluation.SampleRounds(str(folder), json.loads((folder / 'manifest.json').read_text()))
  return torch.cat([torch.from_numpy(saved.read(i)['images']) for i in range(rounds)])


def ema_flow(config, checkpoint):
  """The flow of ``checkpoint``'s EMA weights."""
  state = losses.build_training_state(config, torch.device('cpu'))
  checkpoints.load_checkpoint(str(checkpoint), state, load_optimizer=False)
  state['ema'].copy_to(list(state['model'].parameters()))
  return losses.build_flow(config, state['model']).eval()


def as_saved(config, samples):
  return evaluation.InceptionFeatures.to_uint8(datasets.get_data_inverse_scaler(config)(samples).clamp(0, 1))


@pytest.mark.parametrize('objective', ['rectified_flow', 'meanflow'])
def test_the_eval_sweep_of_a_dit_reports_the_digit_fd_of_its_samples_at_1_and_2_steps(objective, dit_teacher,
                                                                                    tmp_path):
  """The sweep of a DiT checkpoint at sampling.sample_steps = (1, 2) (Euler for the rectified flow, MeanFlow's
  jumps for the MeanFlow): one report per step count, whose saved samples are the EMA network's k-step samples of
  the indexed noise and whose digit_fd is their Frechet distance to the digits."""
  if objective == 'meanflow':
    config = fast_learner(meanflow(tiny_dit_config(n_iters=4, snapshot_freq=4, snapshot_freq_for_preemption=4)))
    run_lib.train(config, str(tmp_path))
  else:
    config = fast_learner(tiny_dit_config(n_iters=4, snapshot_freq=4, snapshot_freq_for_preemption=4))
    (tmp_path / 'checkpoints').mkdir()
    shutil.copy(dit_teacher, tmp_path / 'checkpoints' / 'checkpoint_1.pth')
  config.sampling.sample_steps = (1, 2)
  reports = digits_sweep(config, tmp_path)
  assert [(r['checkpoint'], r['sample_steps'], r['nfe_mean']) for r in reports] == [(1, 1, 1.0), (1, 2, 2.0)]
  assert all(math.isfinite(r['eval_loss']) and math.isfinite(r['digit_fd']) for r in reports)

  flow = ema_flow(config, tmp_path / 'checkpoints' / 'checkpoint_1.pth')
  assert isinstance(flow.model.net, dit.DiT)
  noise = flow_math.indexed_noise(config.seed, 0, 12, (1, 16, 16))
  real, _, _ = evaluation_digits.real_digits()
  samples = {}
  for report in reports:
    k = report['sample_steps']
    images = saved_samples(tmp_path / 'eval' / f'ckpt_1_{k}step', 2)
    config.sampling.sample_N = k
    with torch.no_grad():
      expected = (flow.sample(noise=noise, steps=k) if objective == 'meanflow'
                  else sampling.get_sampling_fn(config, noise.shape)(flow, noise=noise)[0])
    assert (images.int() - as_saved(config, expected).int()).abs().max() <= 1  # 8-bit rounding of round-off.
    assert report['digit_fd'] == pytest.approx(evaluation_digits.frechet_distance_digits(
        evaluation_digits.digit_classifier(), images.float() / 127.5 - 1.0, real), rel=1e-9)
    samples[k] = images
  assert (samples[1].int() - samples[2].int()).abs().max() > 1  # The two rows are two samplers.


def test_pairs_of_a_dit_teacher_are_its_ode_solutions(dit_teacher, tmp_path):
  config = dit_reflow_config(dit_teacher, tmp_path / 'pairs')
  manifest = reflow.generate_reflow_pairs(config, str(tmp_path / 'run'))
  assert manifest['count'] == 10 and manifest['nfe']['mean'] == 3
  pairs = reflow_pairs.PairShards(str(tmp_path / 'pairs'), (1, 16, 16))
  z0 = torch.stack([pairs[i].x0 for i in range(10)])
  z1 = torch.stack([pairs[i].x1 for i in range(10)])
  net, _ = reflow.load_teacher(config, torch.device('cpu'))
  assert isinstance(net, dit.DiT)
  expected, _ = sampling.get_sampling_fn(config, z0.shape)(losses.build_rectified_flow(config, net), noise=z0)
  torch.testing.assert_close(z1, expected, atol=1e-5, rtol=0)
  assert (z1 - z0).abs().max() > 1e-2  # The teacher moves the noise.


@pytest.mark.parametrize('stage', ['2rf', 'distill', '2rfpp'])
def test_a_dit_student_trains_on_its_teachers_pairs_from_the_teachers_weights(stage, dit_teacher, tmp_path,
                                                                              monkeypatch):
  """2-RF (uniform times), one-step distillation (t = 0) and the 2-RF++ recipe (U-shaped times; its pseudo-Huber
  variant, since LPIPS needs a download) on pairs of the DiT teacher: the student starts from the teacher's weights
  (its EMA for 2-RF++), draws its times from the stage's schedule, trains 2 updates and resumes for a third."""
  from configs.rectified_flow.cifar10_2rfpp_train import set_2rfpp_recipe

  reflow.generate_reflow_pairs(dit_reflow_config(dit_teacher, tmp_path / 'pairs'), str(tmp_path / 'gen'))
  config = dit_reflow_config(dit_teacher, tmp_path / 'pairs', reflow_type='train_reflow',
                             reflow_t_schedule={'2rf': 'uniform', 'distill': 't0'}.get(stage, 'uniform'))
  if stage == '2rfpp':
    set_2rfpp_recipe(config).reflow.reflow_loss = 'pseudo_huber'
  state = losses.build_training_state(config, torch.device('cpu'))
  reflow.initialize_student_from_teacher(config, torch.device('cpu'))(state)
  saved = torch.load(dit_teacher, map_location='cpu', weights_only=True)
  start = saved['ema']['shadow_params'] if stage == '2rfpp' else [
      saved['model']['module.' + name] for name, _ in state['model'].named_parameters()]
  assert all(torch.equal(p, s) for p, s in zip(state['model'].parameters(), start))

  training_times, schedules = [], []
  forward, sample_times = dit.DiT.forward, flow_math.sample_times

  def recorded_forward(self, x, time_cond, *args, **kwargs):
    if self.training:
      training_times.append(time_cond.detach() / 999)
    return forward(self, x, time_cond, *args, **kwargs)

  def recorded_sample_times(batch_size, distribution='uniform', **kwargs):
    schedules.append(distribution)
    return sample_times(batch_size, distribution, **kwargs)

  monkeypatch.setattr(dit.DiT, 'forward', recorded_forward)
  monkeypatch.setattr(flow_math, 'sample_times', recorded_sample_times)
  workdir = tmp_path / 'student'
  state = run_lib.reflow(config, str(workdir))
  assert state['step'] == 2 and isinstance(state['model'], dit.DiT)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert sum(math.isfinite(r['training_loss']) for r in records if 'training_loss' in r) == 2
  times = torch.cat(training_times[:2])  # The network times of the two updates' batches of 8.
  if stage == 'distill':
    assert schedules == [] and torch.allclose(times, torch.full((16,), config.training.time_eps))
  else:
    assert set(schedules) == {'u_shaped' if stage == '2rfpp' else 'uniform'}
    assert times.min() >= config.training.time_eps and times.unique().numel() == 16
  config.training.n_iters = 3
  assert run_lib.reflow(config, str(workdir))['step'] == 3


def test_a_guided_class_conditional_dit_is_swept_with_class_agreement_and_doubled_nfe(tmp_path):
  """A class-conditional DiT trained with label dropout, swept with guidance w = 2: two network evaluations per
  sampler step, the digit classifier's agreement with the sampled classes per class, one grid row per digit."""
  config = class_conditional(tiny_dit_config(n_iters=4, snapshot_freq=4, snapshot_freq_for_preemption=4))
  run_lib.train(config, str(tmp_path))
  config.sampling.sample_N = 3
  report, = digits_sweep(config, tmp_path, num_samples=20)
  assert report['guidance_scale'] == 2.0 and report['nfe_mean'] == 6
  per_class = report['class_accuracy_per_class']
  assert sorted(per_class) == [str(c) for c in range(10)] and all(v in (0.0, 0.5, 1.0) for v in per_class.values())
  assert report['class_accuracy'] == pytest.approx(sum(per_class.values()) / 10)
  assert math.isfinite(report['digit_fd'])
