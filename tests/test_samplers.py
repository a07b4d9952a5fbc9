"""The samplers reproduce the published sampler outputs on the tiny DDPM++ fixture (EMA weights), and the stochastic
Euler sampler the published loop."""
import math

import pytest
import torch
from torch import nn

import checkpoints
import losses
import models
import sampling
from configs.default_cifar10_configs import get_default_configs
from rectified_flow_pytorch import flow_math, solvers
from tests.helpers import fixture_config
from tests.reference_data import reference_path


@pytest.fixture(scope='module', params=['ddpmpp_tiny', 'ncsnpp_tiny'])
def ema_velocity(request):
  net = models.create_model(fixture_config(request.param))
  checkpoint = torch.load(reference_path('official_fixtures', f'{request.param}_official_checkpoint.pth'),
                          map_location='cpu', weights_only=True)
  checkpoints.load_network_weights(net, checkpoint['model'])
  ema = models.ExponentialMovingAverage(net.parameters(), decay=0.5)
  ema.load_state_dict(checkpoint['ema'])
  ema.copy_to(net.parameters())
  net.eval()
  io = torch.load(reference_path('official_fixtures', f'{request.param}_io.pt'), map_location='cpu',
                  weights_only=True)
  return models.VelocityField(net), io


def test_euler_matches_the_published_sampler(ema_velocity):
  velocity, io = ema_velocity
  x1, nfe = solvers.euler(velocity, io['sampler_z'], steps=io['euler_N'], t0=1e-3, step_size=1.0 / io['euler_N'])
  assert nfe == io['euler_N']
  torch.testing.assert_close(x1, io['euler_x1'], atol=1e-5, rtol=0)


@pytest.mark.parametrize('state_dtype', [None, torch.float64])
def test_rk45_matches_scipy_solve_ivp(ema_velocity, state_dtype):
  velocity, io = ema_velocity
  x1, nfe = solvers.rk45(velocity, io['sampler_z'], t0=io['rk45_eps'], t1=1.0, rtol=io['rk45_tol'],
                         atol=io['rk45_tol'], state_dtype=state_dtype)
  torch.testing.assert_close(x1, io['rk45_x1'], atol=1e-4, rtol=0)
  assert abs(nfe - io['rk45_nfe']) <= 0.1 * io['rk45_nfe']
  if state_dtype == torch.float64:
    assert nfe == io['rk45_nfe']


def test_rk45_sync_every_keeps_the_published_solution_and_counts_the_extra_calls(ema_velocity):
  velocity, io = ema_velocity
  kwargs = dict(t0=io['rk45_eps'], t1=1.0, rtol=io['rk45_tol'], atol=io['rk45_tol'], state_dtype=torch.float64)
  every_step = solvers.rk45(velocity, io['sampler_z'], **kwargs)
  every_fourth = solvers.rk45(velocity, io['sampler_z'], sync_every=4, **kwargs)
  assert torch.equal(every_fourth.x, every_step.x)
  assert every_fourth.contributing_nfe == every_step.contributing_nfe == every_step.nfe == io['rk45_nfe']
  assert every_step.nfe <= every_fourth.nfe <= every_step.nfe + 6 * 3


@pytest.mark.parametrize('sync_every', [1, 3, 8])
def test_rk45_reads_the_host_once_per_sync_every_attempts_and_nowhere_else(monkeypatch, sync_every):
  original_tolist = torch.Tensor.tolist
  reads = []

  def counted_read(tensor):
    reads.append(tensor.numel())
    return original_tolist(tensor)

  def forbidden(*args, **kwargs):
    raise AssertionError('a device value was read on the host outside solvers._read_host')

  x = torch.randn(4, 3, 8, 8)
  meter = solvers.StraightnessMeter(x)
  with monkeypatch.context() as patch:
    patch.setattr(solvers, '_read_host', counted_read)
    for name in ('__bool__', '__float__', '__int__', '__index__', 'item', 'tolist', 'numpy', 'cpu'):
      patch.setattr(torch.Tensor, name, forbidden)
    solution = solvers.rk45(lambda x, t: torch.sin(3 * x) * flow_math.append_dims(t, x.dim()), x, t0=1e-3, t1=1.0,
                            rtol=1e-9, atol=1e-9, sync_every=sync_every, on_step=meter.on_step)
  attempts = (solution.nfe - 2) // 6
  assert attempts >= 16
  assert len(reads) == solution.host_reads == math.ceil(attempts / sync_every) + 1
  assert reads[:-1] == [1] * (len(reads) - 1)  # The running flag; the last read brings the counts.
  assert meter.value(solution.x).shape == (4,)


class TimedField(nn.Module):
  """A smooth velocity of x and the network time s = t * 999: v = a x + sin(s / 999)."""

  def __init__(self):
    super().__init__()
    self.a = nn.Parameter(torch.tensor(-0.7))

  def forward(self, x, times):
    return self.a * x + torch.sin(times / 999.0).reshape(-1, 1, 1, 1)


def test_stochastic_euler_is_the_published_loop_and_sigma_variance_0_is_plain_euler():
  steps, eps, noise_std, sigma_variance = 5, 1e-3, 1.5, 0.8
  field, z = TimedField(), torch.randn(3, 2, 4, 4)

  def sampled(sigma):
    config = get_default_configs()
    config.sampling.use_ode_sampler, config.sampling.sample_N = 'euler', steps
    config.sampling.sigma_variance, config.sampling.init_noise_scale = sigma, noise_std
    flow_ = losses.build_rectified_flow(config, field)
    return sampling.get_sampling_fn(config, z.shape)(flow_, noise=z, generator=torch.Generator().manual_seed(5))

  # The published stochastic Euler step at t_i = eps + i (1 - eps) / N with dt = 1/N: sigma_t = (1 - t) sigma_variance,
  # x += (v + sigma_t^2 / (2 noise_std^2 (1 - t)^2) (t (1 - t) v / 2 - (2 - t) x / 2)) dt + sigma_t sqrt(dt) n with
  # n ~ N(0, I) drawn, step by step, from the generator given to the sampler.
  generator = torch.Generator().manual_seed(5)
  stochastic, plain = z.clone(), z.clone()
  with torch.no_grad():
    for i in range(steps):
      t = eps + i / steps * (1 - eps)
      v = field(stochastic, torch.full((3,), t) * 999)
      sigma_t = (1 - t) * sigma_variance
      correction = sigma_t ** 2 / (2 * noise_std ** 2 * (1 - t) ** 2) * (
          0.5 * t * (1 - t) * v - 0.5 * (2 - t) * stochastic)
      stochastic = stochastic + (v + correction) / steps + sigma_t * math.sqrt(1 / steps) * torch.randn(
          z.shape, generator=generator)
      plain = plain + field(plain, torch.full((3,), t) * 999) / steps
  solution = sampled(sigma_variance)
  assert solution.nfe == steps
  torch.testing.assert_close(solution.x, stochastic, atol=1e-5, rtol=0)
  torch.testing.assert_close(sampled(0.0).x, plain, atol=1e-6, rtol=0)
  assert (stochastic - plain).abs().max() > 0.1


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape,chunk,draws', [((3, 2, 4, 4), None, 1), ((3, 2, 4, 4), 3 * 96, 3),
                                               ((2, 3, 5, 5), None, 7)])
def test_stochastic_euler_draws_a_solves_noise_at_once_with_the_samples_of_step_by_step_draws(
    monkeypatch, dtype, shape, chunk, draws):
  """From a CPU generator (the framework's: seeded per sample block) the stochastic Euler sampler draws the noise of
  all its steps in one call (in chunks of at most ``solvers._NOISE_CHUNK_ELEMENTS`` values: 3 steps of 96 here), so
  that a solve on CUDA makes one host draw and one host -> device copy per chunk, not one per step. The samples, and
  the generator's state after the solve, are those of step-by-step draws bit for bit: the CPU normal kernel fills
  blocks of 16 values, so k draws of a multiple of 16 values are one draw of k times as many. Other sizes (5 x 5
  images here) keep one draw per step."""
  if chunk is not None:
    monkeypatch.setattr(solvers, '_NOISE_CHUNK_ELEMENTS', chunk)
  steps, eps, noise_std, sigma_variance = 7, 1e-3, 1.5, 0.8
  x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
  field = TimedField().to(dtype)

  def velocity(x, t):
    return field(x, t * 999)

  generator = torch.Generator().manual_seed(5)
  stepwise = x.clone()
  with torch.no_grad():
    for i in range(steps):  # The loop with its noise drawn step by step, as the sampler did.
      t = eps + i / steps * (1 - eps)
      v = velocity(stepwise, torch.full((shape[0],), t, dtype=dtype))
      sigma_t = (1 - t) * sigma_variance
      correction = sigma_t ** 2 / (2 * noise_std ** 2 * (1 - t) ** 2)
      drift = v + correction * (0.5 * t * (1 - t) * v - 0.5 * (2 - t) * stepwise)
      stepwise = stepwise + drift * (1 / steps) + sigma_t * math.sqrt(1 / steps) * torch.randn(
          shape, generator=generator, dtype=dtype)

  calls = []
  randn = torch.randn

  def counted(*args, **kwargs):
    calls.append(kwargs.get('generator'))
    return randn(*args, **kwargs)

  monkeypatch.setattr(torch, 'randn', counted)
  sampler_generator = torch.Generator().manual_seed(5)
  solution = solvers.euler(velocity, x, steps=steps, t0=eps, t1=1.0, step_size=1.0 / steps,
                           sigma_variance=sigma_variance, noise_std=noise_std, generator=sampler_generator)
  assert len(calls) == draws and all(g is sampler_generator for g in calls)
  assert solution.x.dtype == dtype and torch.equal(solution.x, stepwise)
  assert torch.equal(sampler_generator.get_state(), generator.get_state())
