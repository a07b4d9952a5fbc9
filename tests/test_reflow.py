"""--mode reflow: pair generation (atomic, resumable, two layouts), reflow / distillation training, LPIPS."""
import json
import os
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

import evaluation
import losses
import models
import reflow
import run_lib
import sampling
from datasets import reflow_pairs
from rectified_flow_pytorch import flow_math
from tests.helpers import tiny_digits_config


def reflow_config(teacher, data_root, **reflow):
  config = tiny_digits_config(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=1)
  config.reflow.last_flow_ckpt = str(teacher)
  config.reflow.data_root = str(data_root)
  config.reflow.total_number_of_samples = 10
  config.reflow.pairs_per_shard = 4
  config.sampling.sample_N = 3
  for key, value in reflow.items():
    config.reflow[key] = value
  return config


@pytest.fixture(scope='module')
def teacher(tiny_run):
  """The snapshot of the session's tiny run (the architecture of ``tiny_digits_config``); read, never written."""
  return tiny_run / 'checkpoints' / 'checkpoint_1.pth'


def read_shards(folder):
  return {name: np.load(os.path.join(folder, name)) for name in sorted(os.listdir(folder)) if name.endswith('.npy')}


# ---------------------------------------------------------------------------------------------------------------
# Time schedules.

def test_reflow_time_schedules():
  eps = 1e-3
  assert losses.reflow_time_schedule('uniform', eps) is None
  assert torch.all(losses.reflow_time_schedule('t0', eps)(5, 'cpu') == eps)
  assert torch.all(losses.reflow_time_schedule('t1', eps)(5, 'cpu') == 1.0)
  grid = losses.reflow_time_schedule('4', eps)(4000, 'cpu')
  expected = torch.tensor([eps + i * (1 - eps) / 4 for i in range(4)])
  assert torch.allclose(torch.unique(grid), expected)
  with pytest.raises(ValueError, match="'uniform', 't0', 't1'"):
    losses.reflow_time_schedule('t2', eps)
  with pytest.raises(ValueError, match='u_shaped_a must be > 0'):
    losses.reflow_time_schedule('u_shaped', eps, u_shaped_a=0.0)


def u_shaped_cdf(t, a):
  """CDF of Lee et al. 2024's U-shaped density, proportional to exp(a t) + exp(a (1 - t)) = 2 e^(a/2) cosh(a (t - 1/2))
  on [0, 1]."""
  return (np.sinh(a * (t - 0.5)) + np.sinh(a / 2)) / (2 * np.sinh(a / 2))


@pytest.mark.parametrize('a', [4.0, 2.0])
def test_u_shaped_schedule_draws_lee_et_al_times_heavier_at_both_ends(a):
  """The 'u_shaped' reflow times are the library's u_shaped draws, with the density of Lee et al.'s code (t_dist.py,
  ``--a``) squeezed into [eps, 1]: a histogram of 200,000 draws matches its ten bins to 0.005, and both end bins
  hold more than uniform times would (the middle ones less)."""
  eps, n = 1e-3, 200000
  times = losses.reflow_time_schedule('u_shaped', eps, u_shaped_a=a)(n, 'cpu', torch.Generator().manual_seed(0))
  library = flow_math.sample_times(n, 'u_shaped', eps=eps, generator=torch.Generator().manual_seed(0), a=a / 2)
  assert torch.equal(times, library)
  assert times.dtype == torch.float32 and eps <= times.min() and times.max() <= 1.0
  unsqueezed = ((times - eps) / (1 - eps)).double().numpy()
  edges = np.linspace(0.0, 1.0, 11)
  observed = np.histogram(unsqueezed, bins=edges)[0] / n
  expected = np.diff(u_shaped_cdf(edges, a))
  np.testing.assert_allclose(observed, expected, atol=0.005)
  assert observed[0] > 0.1 + 0.01 and observed[-1] > 0.1 + 0.01 and observed[4:6].max() < 0.1 - 0.01


# ---------------------------------------------------------------------------------------------------------------
# Pair generation.

def test_pairs_are_the_teachers_ode_solutions_with_a_complete_manifest(teacher, tmp_path):
  config = reflow_config(teacher, tmp_path / 'pairs')
  manifest = reflow.generate_reflow_pairs(config, str(tmp_path / 'run'))
  assert manifest['count'] == 10 and sorted(manifest['shards']) == ['0', '1', '2']
  assert manifest['teacher_sha256'] == evaluation.file_sha256(teacher)
  assert manifest['sampler'] == 'euler' and manifest['sample_N'] == 3 and manifest['nfe']['mean'] == 3
  assert manifest['pair_format'] == 'float32' and manifest['bytes_per_pair'] == 2 * 4 * 256

  pairs = reflow_pairs.PairShards(str(tmp_path / 'pairs'), (1, 16, 16))
  assert len(pairs) == 10
  z0 = torch.stack([pairs[i].x0 for i in range(10)])
  z1 = torch.stack([pairs[i].x1 for i in range(10)])
  torch.testing.assert_close(z0, flow_math.indexed_noise(config.seed, 0, 10, (1, 16, 16)))
  net, _ = reflow.load_teacher(config, torch.device('cpu'))
  flow = losses.build_rectified_flow(config, net)
  expected, _ = sampling.get_sampling_fn(config, z0.shape)(flow, noise=z0)
  torch.testing.assert_close(z1, expected, atol=1e-5, rtol=0)


def test_a_killed_generation_resumes_without_duplicated_or_missing_pairs(teacher, tmp_path):
  config = reflow_config(teacher, tmp_path / 'pairs')
  reflow.generate_reflow_pairs(config, str(tmp_path / 'run'))
  folder = tmp_path / 'pairs' / f'seed_{config.seed}'
  complete = read_shards(folder)
  # Simulate a kill while shard 1 was being written: its file is gone, a half-written temporary is left.
  os.remove(folder / 'shard_000001.npy')
  (folder / 'shard_000001.npy.tmp-999.npy').write_bytes(b'partial')
  reflow.generate_reflow_pairs(config, str(tmp_path / 'run'))
  resumed = read_shards(folder)
  assert resumed.keys() == complete.keys()
  for name in complete:
    np.testing.assert_array_equal(resumed[name], complete[name])
  pairs = reflow_pairs.PairShards(str(tmp_path / 'pairs'))
  z0 = torch.stack([pairs[i].x0 for i in range(len(pairs))])
  assert len(pairs) == 10 and len(torch.unique(z0.flatten(1), dim=0)) == 10


def test_compact_layout_regenerates_z0_and_is_four_times_smaller(teacher, tmp_path):
  reflow.generate_reflow_pairs(reflow_config(teacher, tmp_path / 'full'), str(tmp_path / 'run'))
  compact = reflow.generate_reflow_pairs(reflow_config(teacher, tmp_path / 'compact', pair_format='compact'),
                                          str(tmp_path / 'run'))
  full_pairs = reflow_pairs.PairShards(str(tmp_path / 'full'))
  compact_pairs = reflow_pairs.PairShards(str(tmp_path / 'compact'))
  for i in range(10):
    torch.testing.assert_close(compact_pairs[i].x0, full_pairs[i].x0, atol=0, rtol=0)
    torch.testing.assert_close(compact_pairs[i].x1, full_pairs[i].x1, atol=2e-3, rtol=1e-3)  # float16 z1.
  full_bytes = sum(f.stat().st_size for f in (tmp_path / 'full').rglob('*.npy'))
  compact_bytes = sum(f.stat().st_size for f in (tmp_path / 'compact').rglob('*.npy'))
  assert compact['bytes_per_pair'] * 4 == 2 * 4 * 256
  assert full_bytes / compact_bytes > 3.5


def test_pairs_from_other_settings_are_refused(teacher, tmp_path):
  reflow.generate_reflow_pairs(reflow_config(teacher, tmp_path / 'pairs'), str(tmp_path / 'run'))
  other = reflow_config(teacher, tmp_path / 'pairs')
  other.sampling.sample_N = 5
  with pytest.raises(ValueError, match='sample_N: 3 there, 5 now'):
    reflow.generate_reflow_pairs(other, str(tmp_path / 'run'))


def test_too_little_disk_is_refused_before_generating(teacher, tmp_path, monkeypatch):
  usage = namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10**9, 10**9 - 1000, 1000))
  config = reflow_config(teacher, tmp_path / 'pairs', total_number_of_samples=100000)
  with pytest.raises(OSError, match=r"GB but .* free.*'compact'"):
    reflow.generate_reflow_pairs(config, str(tmp_path / 'run'))
  assert not list((tmp_path / 'pairs').rglob('*.npy'))


def test_a_broken_shard_is_a_clear_error(teacher, tmp_path):
  reflow.generate_reflow_pairs(reflow_config(teacher, tmp_path / 'pairs'), str(tmp_path / 'run'))
  (tmp_path / 'pairs' / 'seed_42' / 'shard_000002.npy').write_bytes(b'not a numpy file')
  pairs = reflow_pairs.PairShards(str(tmp_path / 'pairs'))
  with pytest.raises(ValueError, match='shard_000002.npy.*unreadable.*delete it'):
    pairs[9]


def test_missing_teacher_and_missing_pairs_are_clear_errors(tmp_path):
  config = reflow_config(tmp_path / 'nope.pth', tmp_path / 'pairs', reflow_type='train_reflow')
  with pytest.raises(FileNotFoundError, match='reflow.last_flow_ckpt'):
    run_lib.reflow(config, str(tmp_path / 'run'))
  with pytest.raises(FileNotFoundError, match='generate pairs first'):
    reflow_pairs.PairShards(str(tmp_path / 'pairs'))


# ---------------------------------------------------------------------------------------------------------------
# Training on pairs.

@pytest.mark.parametrize('init_from_ema', [False, True])
def test_student_starts_from_the_teacher_with_fresh_optimiser_and_ema(teacher, tmp_path, init_from_ema):
  config = reflow_config(teacher, tmp_path / 'pairs', reflow_type='train_reflow', init_from_ema=init_from_ema)
  state = losses.build_training_state(config, torch.device('cpu'))
  reflow.initialize_student_from_teacher(config, torch.device('cpu'))(state)
  saved = torch.load(teacher, map_location='cpu', weights_only=True)
  params = [p for p in state['model'].parameters() if p.requires_grad]
  if init_from_ema:
    for p, shadow in zip(params, saved['ema']['shadow_params']):
      assert torch.equal(p, shadow)
  else:
    for key, value in state['model'].state_dict().items():
      assert torch.equal(value, saved['model']['module.' + key])
  assert state['ema'].num_updates == 0 and all(torch.equal(s, p) for s, p in zip(state['ema'].shadow_params, params))
  assert state['step'] == 0 and not state['optimizer'].state


@pytest.mark.parametrize('reflow_type,schedule', [('train_reflow', 'uniform'), ('train_reflow', 't0'),
                                                  ('train_reflow', '2'), ('train_online_reflow', 'uniform')])
def test_reflow_training_runs_in_the_shared_loop_and_resumes(teacher, tmp_path, reflow_type, schedule):
  reflow.generate_reflow_pairs(reflow_config(teacher, tmp_path / 'pairs'), str(tmp_path / 'gen'))
  config = reflow_config(teacher, tmp_path / 'pairs', reflow_type=reflow_type, reflow_t_schedule=schedule,
                         online_teacher_steps=2)
  workdir = tmp_path / 'student'
  state = run_lib.reflow(config, str(workdir))
  assert state['step'] == 2
  assert (workdir / 'checkpoints' / 'checkpoint_1.pth').is_file()
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(r['training_loss']) for r in records if 'training_loss' in r)
  config.training.n_iters = 3
  assert run_lib.reflow(config, str(workdir))['step'] == 3  # Resumed from the preemption checkpoint.


@pytest.mark.parametrize('classes', [0, 10])
def test_online_pairs_are_drawn_on_the_generators_device_and_keep_the_cpu_stream(monkeypatch, classes):
  """Every draw of the online pairs names the data generator's device: on CUDA that generator is on the GPU (resident
  data), where a draw without device= fails and a host draw would be copied every update. On the CPU the pairs keep
  their stream: the noise, then the labels, of each global batch drawn whole from the generator."""
  config = tiny_digits_config()
  config.model.num_classes = classes
  config.training.grad_accum_steps = 2
  config.reflow.online_teacher_steps = 2
  size, shape = config.training.batch_size, (config.data.num_channels, config.data.image_size, config.data.image_size)
  plain = {'randn': torch.randn, 'randint': torch.randint}
  draws = []

  def recorded(name):
    def draw(*args, **kwargs):
      if kwargs.get('generator') is not None:
        draws.append((name, kwargs.get('device'), kwargs['generator'].device))
      return plain[name](*args, **kwargs)
    return draw

  for name in plain:
    monkeypatch.setattr(torch, name, recorded(name))

  def teacher(x, t, labels=None, **guidance):
    return -x * t.reshape(-1, 1, 1, 1)

  generator = torch.Generator().manual_seed(3)
  stream = reflow.online_pair_batches(config, teacher, torch.device('cpu'), generator)
  training = [next(stream) for _ in range(4)]  # Two updates of two micro-batches.
  held_out = next(reflow.online_pair_batches(config, teacher, torch.device('cpu'), torch.Generator().manual_seed(4),
                                             training=False))
  assert len(draws) == 3 * (2 if classes else 1)
  for name, device, generator_device in draws:
    assert device is not None and torch.device(device) == generator_device, (name, device, generator_device)

  expected = torch.Generator().manual_seed(3)
  for update in range(2):
    z0 = plain['randn']((size, *shape), generator=expected) * config.sampling.init_noise_scale
    labels = plain['randint'](classes, (size,), generator=expected) if classes else None  # Drawn after the noise.
    micro = training[2 * update:2 * update + 2]
    assert torch.equal(torch.cat([b.x0 for b in micro]), z0)
    if classes:
      assert torch.equal(torch.cat([b.labels for b in micro]), labels)
    else:
      assert all(b.labels is None for b in micro)
    assert [b.rows for b in micro] == [slice(0, size // 2), slice(size // 2, size)]
  z0_held_out = plain['randn']((size, *shape), generator=torch.Generator().manual_seed(4))
  assert torch.equal(held_out.x0, z0_held_out * config.sampling.init_noise_scale)
  assert held_out.x0.shape[0] == size


# ---------------------------------------------------------------------------------------------------------------
# LPIPS.

def test_reflow_lpips_losses_are_the_lpips_package_on_the_one_step_estimate_plus_the_l2_term():
  import lpips
  import torch.nn.functional as F

  torch.manual_seed(0)
  lpips_model = losses.build_lpips(random_backbone=True)
  config = tiny_digits_config()
  config.model.init_scale = 1.0  # Not the published near-zero output layer: v enters both terms visibly.
  config.reflow.reflow_t_schedule = 't0'
  net = models.create_model(config).eval()  # No dropout: the loss and the reference see the same network.
  flow = losses.build_rectified_flow(config, net)
  z0, z1 = torch.randn(2, 1, 16, 16), torch.rand(2, 1, 16, 16) * 2 - 1
  ours = {}
  with torch.no_grad():
    for name in ('lpips', 'lpips+l2'):
      config.reflow.reflow_loss = name
      ours[name] = losses.get_loss_fn(config, flow, reflow=True, lpips_model=lpips_model)(z0, z1)
    # t = eps for every pair ('t0'): X_t = t z1 + (1 - t) z0, the network sees t * 999, and the one-step estimate
    # of the data is X1_hat = X_t + (1 - t) v.
    eps = config.training.time_eps
    x_t = eps * z1 + (1 - eps) * z0
    v = net(x_t, torch.full((2,), eps) * 999)
    estimate = x_t + (1 - eps) * v

    def up(x):
      return F.interpolate(x.repeat(1, 3, 1, 1), size=(224, 224), mode='bilinear', align_corners=False)

    reference = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False)
    reference.net.load_state_dict(lpips_model.net.state_dict())  # The same random backbone.
    perceptual = reference(up(estimate), up(z1)).reshape(-1)  # (2,)
    l2 = (v - (z1 - z0)).square().flatten(1).mean(1)  # (2,) the per-sample mean squared error (reduce_mean)
  torch.testing.assert_close(ours['lpips'], perceptual.mean())
  torch.testing.assert_close(ours['lpips+l2'], (perceptual + l2).mean())
  assert perceptual.min() > 0 and l2.min() > 0


def test_lpips_huber_reflow_loss_is_the_librarys_on_the_u_shaped_times():
  """reflow.reflow_loss='lpips_huber' is the library's RectifiedFlow(loss='lpips_huber') with the lpips package on
  224x224 images, at the 'u_shaped' times drawn after the noise; and, written out, (pseudo-Huber(X1_hat, X1) +
  LPIPS(X1_hat, X1)) / (1 - t) with X1_hat = X_t + (1 - t) v."""
  import lpips
  import torch.nn.functional as F

  from rectified_flow_pytorch import RectifiedFlow

  torch.manual_seed(0)
  lpips_model = losses.build_lpips(random_backbone=True)
  config = tiny_digits_config()
  config.model.init_scale = 1.0  # Not the published near-zero output layer: v enters both terms visibly.
  config.reflow.reflow_t_schedule, config.reflow.u_shaped_a, config.reflow.reflow_loss = 'u_shaped', 3.0, 'lpips_huber'
  net = models.create_model(config).eval()  # No dropout: the loss and the references see the same network.
  flow = losses.build_rectified_flow(config, net)
  batch, eps = 3, config.training.time_eps
  z0, z1 = torch.randn(batch, 1, 16, 16), torch.rand(batch, 1, 16, 16) * 2 - 1

  def up(x):
    return F.interpolate(x.repeat(1, 3, 1, 1), size=(224, 224), mode='bilinear', align_corners=False)

  reference_lpips = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False)
  reference_lpips.net.load_state_dict(lpips_model.net.state_dict())  # The same random backbone.
  with torch.no_grad():
    ours = losses.get_loss_fn(config, flow, reflow=True, lpips_model=lpips_model)(
        z0, z1, generator=torch.Generator().manual_seed(5), global_batch=batch)
    generator = torch.Generator().manual_seed(5)
    torch.randn(z1.shape, generator=generator)  # The noise, drawn first (a pair brings its own z0).
    times = flow_math.sample_times(batch, 'u_shaped', eps=eps, generator=generator, a=1.5)
    library = RectifiedFlow(models.VelocityField(net), time_cond_kwarg='times', loss='lpips_huber',
                            perceptual_loss=lambda x, y: reference_lpips(up(x), up(y)))(z1, noise=z0, times=times)
    t = times.reshape(-1, 1, 1, 1)
    x_t = t * z1 + (1 - t) * z0
    estimate = x_t + (1 - t) * net(x_t, times * 999)
    c = 0.00054 * 16  # 0.00054 sqrt(d), d = 256
    huber = torch.sqrt((estimate - z1).square().flatten(1).sum(1) + c * c) - c
    perceptual = reference_lpips(up(estimate), up(z1)).reshape(-1)
    written_out = ((huber + perceptual) / (1 - times)).mean()
  torch.testing.assert_close(ours, library)
  torch.testing.assert_close(ours, written_out)
  assert huber.min() > 0 and perceptual.min() > 0 and times.max() - times.min() > 0.1


def test_pseudo_huber_reflow_loss_is_the_pseudo_huber_distance_of_the_velocity():
  """reflow.reflow_loss='pseudo_huber' (the 2-RF++ recipe without LPIPS) is, written out, the batch mean of
  sqrt(||v(X_t, t) - (X1 - X0)||^2 + c^2) - c with c = 0.00054 sqrt(d), at the schedule's times drawn after the
  noise; it needs no LPIPS model."""
  torch.manual_seed(0)
  config = tiny_digits_config()
  config.model.init_scale = 1.0
  config.reflow.reflow_t_schedule, config.reflow.reflow_loss = 'u_shaped', 'pseudo_huber'
  net = models.create_model(config).eval()
  flow = losses.build_rectified_flow(config, net)
  batch, eps = 3, config.training.time_eps
  z0, z1 = torch.randn(batch, 1, 16, 16), torch.rand(batch, 1, 16, 16) * 2 - 1
  with torch.no_grad():
    ours = losses.get_loss_fn(config, flow, reflow=True)(z0, z1, generator=torch.Generator().manual_seed(5),
                                                         global_batch=batch)
    generator = torch.Generator().manual_seed(5)
    torch.randn(z1.shape, generator=generator)  # The noise, drawn first (a pair brings its own z0).
    times = flow_math.sample_times(batch, 'u_shaped', eps=eps, generator=generator, a=2.0)
    t = times.reshape(-1, 1, 1, 1)
    x_t = t * z1 + (1 - t) * z0
    c = 0.00054 * 16  # 0.00054 sqrt(d), d = 256
    written_out = (torch.sqrt((net(x_t, times * 999) - (z1 - z0)).square().flatten(1).sum(1) + c * c) - c).mean()
  torch.testing.assert_close(ours, written_out)


def test_a_2rfpp_config_trains_on_generated_pairs(teacher, tmp_path, monkeypatch):
  """The 2-RF++ recipe of configs/rectified_flow/cifar10_2rfpp_train.py on the tiny model: two updates on pairs of
  the teacher at U-shaped times (Lee et al.'s a = 4: the library's 2) with the LPIPS-Huber loss (the random-backbone
  LPIPS); the student starts from the teacher's EMA weights (reflow.init_from_ema, tested above)."""
  from configs.rectified_flow.cifar10_2rfpp_train import get_config as cifar10_2rfpp_config
  from configs.rectified_flow.cifar10_2rfpp_train import set_2rfpp_recipe

  recipe = cifar10_2rfpp_config().reflow
  assert (recipe.reflow_type, recipe.reflow_t_schedule, recipe.u_shaped_a, recipe.reflow_loss,
          recipe.init_from_ema) == ('train_reflow', 'u_shaped', 4.0, 'lpips_huber', True)
  reflow.generate_reflow_pairs(reflow_config(teacher, tmp_path / 'pairs'), str(tmp_path / 'gen'))
  config = set_2rfpp_recipe(reflow_config(teacher, tmp_path / 'pairs', reflow_type='train_reflow'))
  lpips_model = losses.build_lpips(random_backbone=True)
  lpips_inputs, schedules = [], []
  lpips_model.register_forward_pre_hook(lambda module, inputs: lpips_inputs.append(inputs[0].shape))
  monkeypatch.setattr(losses, 'build_lpips', lambda *args, **kwargs: lpips_model)
  sample_times = flow_math.sample_times

  def recorded_sample_times(batch_size, distribution='uniform', **kwargs):
    schedules.append((distribution, kwargs.get('a')))
    return sample_times(batch_size, distribution, **kwargs)

  monkeypatch.setattr(flow_math, 'sample_times', recorded_sample_times)
  pseudo_huber, huber_inputs = flow_math.per_sample_pseudo_huber, []

  def recorded_pseudo_huber(prediction, target, c=None):
    huber_inputs.append(prediction.shape)
    return pseudo_huber(prediction, target, c)

  monkeypatch.setattr(flow_math, 'per_sample_pseudo_huber', recorded_pseudo_huber)
  workdir = tmp_path / 'student'
  state = run_lib.reflow(config, str(workdir))
  assert state['step'] == 2 and (workdir / 'checkpoints' / 'checkpoint_1.pth').is_file()
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  training_losses = [r['training_loss'] for r in records if 'training_loss' in r]
  assert len(training_losses) == 2 and np.all(np.isfinite(training_losses))
  assert len(schedules) >= 2 and set(schedules) == {('u_shaped', 2.0)}  # Every draw of times, held-out ones too.
  # The two updates' LPIPS-Huber loss on their batches: pseudo-Huber on the (B, C, H, W) estimates, LPIPS at 224x224.
  assert huber_inputs[:2] == [torch.Size([8, 1, 16, 16])] * 2
  assert lpips_inputs[:2] == [torch.Size([8, 3, 224, 224])] * 2


class RecordingField(torch.nn.Module):
  """v = a x + s / 999 of the network time s; records the time inputs."""

  def __init__(self):
    super().__init__()
    self.a = torch.nn.Parameter(torch.tensor(0.3))
    self.times = []

  def forward(self, x, times):
    self.times.append(times.detach().clone())
    return self.a * x + (times / 999.0).reshape(-1, 1, 1, 1)


def test_t1_schedule_trains_every_pair_at_t_1_the_inversion():
  config = tiny_digits_config()
  config.reflow.reflow_t_schedule, config.reflow.reflow_loss = 't1', 'l2'
  field = RecordingField()
  loss_fn = losses.get_loss_fn(config, losses.build_rectified_flow(config, field), reflow=True)
  z0, z1 = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
  with torch.no_grad():
    loss = loss_fn(z0, z1, generator=torch.Generator().manual_seed(0), global_batch=4)
  assert len(field.times) == 1 and torch.equal(field.times[0], torch.full((4,), 999.0))  # t = 1 for every pair.
  # At t = 1, X_t = z1: the flow learns the velocity z1 - z0 at the data, which one Euler step back inverts.
  expected = (0.3 * z1 + 1.0 - (z1 - z0)).square().flatten(1).mean(1).mean()
  torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize('pair_format', ['float32', 'compact'])
def test_pair_shards_are_memory_mapped_and_items_are_their_rows(tmp_path, pair_format):
  shape, seed = (1, 4, 4), 3
  settings = {'pair_format': pair_format, 'image_shape': list(shape), 'init_noise_scale': 1.0}
  writer = reflow_pairs.PairShardWriter(str(tmp_path), seed, settings, total_pairs=5, pairs_per_shard=3)
  for index in range(writer.num_shards):
    first, count = writer.shard_range(index)
    writer.write_shard(index, flow_math.indexed_noise(seed, first, count, shape), torch.randn(count, *shape), nfe=1)
  pairs = reflow_pairs.PairShards(str(tmp_path), shape)
  assert len(pairs) == 5
  for i in range(5):  # Item i is row i % 3 of shard i // 3, as np.load reads it.
    shard, row = divmod(i, 3)
    array = np.load(writer.shard_path(shard))
    z0, z1, _, labels = pairs[i]
    assert labels is None
    if pair_format == 'float32':  # (2, N, C, H, W)
      assert torch.equal(z0, torch.from_numpy(array[0, row])) and torch.equal(z1, torch.from_numpy(array[1, row]))
    else:  # (N, C, H, W) float16 z1; z0 from the seed of pair i.
      assert torch.equal(z1, torch.from_numpy(array[row].astype(np.float32)))
      assert torch.equal(z0, flow_math.indexed_noise(seed, i, 1, shape)[0])
  # Memory-mapped: shard 0 is open, yet a row changed on disk since is read as it is now, not from a copy loaded
  # when the shard was opened.
  on_disk = np.load(writer.shard_path(0), mmap_mode='r+')
  on_disk[(1, 2) if pair_format == 'float32' else 2] = 7.0
  on_disk.flush()
  del on_disk
  assert torch.all(pairs[2].x1 == 7.0)


def test_lpips_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
  import urllib.error

  monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))

  def offline(*args, **kwargs):
    raise urllib.error.URLError('no network')

  monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
  with pytest.raises(ConnectionError, match='vgg16-397923af.pth.*reflow.lpips_weights_path'):
    losses.build_lpips()
