"""Sampling options: the solver's state dtype, bf16 network calls, CUDA graphs of the network call, and how the
manifests of evaluation rounds and reflow pairs record them. The CUDA tests skip with a reason without CUDA."""
import json

import pytest
import torch

import checkpoints
import evaluation
import losses
import models
import sampling
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config
from datasets import reflow_pairs
from rectified_flow_pytorch import RectifiedFlow
from speed import cuda_graphs
from tests.helpers import load_fixture

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (torch.cuda.is_available() is '
                                   'False): CUDA-graph capture and replay exist only on a GPU')
# The manifest keys that sampler_settings wrote before ode_state_dtype and precision existed.
LEGACY_SETTINGS = {'sampler', 'sample_N', 'ode_tol', 'eps', 'sigma_variance', 'init_noise_scale'}


def tiny_config(**sampling_options):
  """The CIFAR-10 DDPM++ family at 16x16 with nf 16 (the fixtures' size); init_scale 1 makes the field far from
  constant, so RK45 takes tens of steps and low precision shows."""
  config = get_config()
  config.data.image_size = 16
  config.model.update(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, init_scale=1.0)
  config.sampling.ode_tol = 1e-3
  config.sampling.sample_N = 4
  for key, value in sampling_options.items():
    config.sampling[key] = value
  return config


def tiny_flow(config, device='cpu', seed=0):
  torch.manual_seed(seed)
  net = models.create_model(config).to(device).eval()
  return losses.build_rectified_flow(config, net)


def sample(config, flow, noise, **options):
  """One solve with ``config.sampling`` overridden by ``options``."""
  config = config.copy_and_resolve_references()
  for key, value in options.items():
    config.sampling[key] = value
  return sampling.get_sampling_fn(config, noise.shape)(flow, noise=noise)


def noise_batch(config, batch=2, device='cpu', seed=1):
  shape = (batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------------------------------------------
# sampling.ode_state_dtype against the published sampler (scipy solve_ivp in float64).

@pytest.fixture(scope='module')
def published_rk45():
  """The tiny DDPM++ fixture with its EMA weights as a flow, its RK45 problem, and a config set to that problem."""
  net, checkpoint, io = load_fixture('ddpmpp_tiny')
  checkpoints.load_network_weights(net, checkpoint['model'])
  ema = models.ExponentialMovingAverage(net.parameters(), decay=0.5)
  ema.load_state_dict(checkpoint['ema'])
  ema.copy_to(net.parameters())
  config = get_config()
  config.training.time_eps = io['rk45_eps']
  config.sampling.use_ode_sampler = 'rk45'
  config.sampling.ode_tol = io['rk45_tol']
  return losses.build_rectified_flow(config, net.eval()), io, config


def test_float64_state_reproduces_the_published_solve_ivp_x1_and_nfe(published_rk45):
  flow, io, config = published_rk45
  solution = sample(config, flow, io['sampler_z'], ode_state_dtype='float64')
  assert solution.x.dtype == torch.float32  # Cast at the end, as the published sampler did.
  assert (solution.x - io['rk45_x1']).abs().max().item() <= 1e-4
  assert solution.nfe == solution.contributing_nfe == io['rk45_nfe']


def test_state_dtype_reaches_the_solver_while_the_network_keeps_its_own():
  config = tiny_config(use_ode_sampler='rk45')
  flow = tiny_flow(config)
  seen_by_network, seen_by_solver = set(), set()
  flow.model.net.register_forward_pre_hook(lambda module, args: seen_by_network.add((args[0].dtype, args[1].dtype)))
  noise = noise_batch(config)
  config.sampling.ode_state_dtype = 'float64'
  solution = sampling.get_sampling_fn(config, noise.shape)(flow, noise=noise,
                                                           on_step=lambda t, h, v: seen_by_solver.add(v.dtype))
  assert seen_by_solver == {torch.float64} and seen_by_network == {(torch.float32, torch.float32)}
  assert solution.x.dtype == torch.float32
  assert not torch.equal(solution.x, sample(config, flow, noise, ode_state_dtype='float32').x)


def test_network_velocity_casts_to_the_parameter_dtype_and_back():
  torch.manual_seed(0)
  flow = RectifiedFlow(torch.nn.Conv2d(3, 3, 3, padding=1).double(), time_cond_kwarg=None)
  x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.3)
  v = sampling.network_velocity(flow)(x, t)
  assert v.dtype == torch.float32
  torch.testing.assert_close(v, flow.velocity(x.double(), t.double()).float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# sampling.precision.

@pytest.mark.parametrize('sampler', ['euler', 'rk45'])
def test_bf16_network_calls_return_the_state_dtype_and_stay_close_to_fp32(sampler):
  config = tiny_config(use_ode_sampler=sampler)
  flow = tiny_flow(config)
  noise = noise_batch(config)
  fp32 = sample(config, flow, noise)
  bf16 = sample(config, flow, noise, precision='bf16')
  assert bf16.x.dtype == fp32.x.dtype == torch.float32
  difference = (bf16.x - fp32.x).abs().max().item()
  travelled = (fp32.x - noise).abs().max().item()
  assert 0 < difference < 0.05 * travelled  # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%).
  assert abs(bf16.nfe - fp32.nfe) <= 0.2 * fp32.nfe

  x, t = noise.double(), torch.full((2,), 0.5, dtype=torch.float64)
  v_bf16 = sampling.network_velocity(flow, 'bf16')(x, t)
  v_fp32 = sampling.network_velocity(flow, 'fp32')(x, t)
  assert v_bf16.dtype == torch.float64 and not torch.equal(v_bf16, v_fp32)


def test_unknown_state_dtype_or_precision_lists_the_valid_values():
  with pytest.raises(ValueError, match=r"sampling.ode_state_dtype 'float16'; valid: \['float32', 'float64'\]"):
    sampling.get_sampling_fn(tiny_config(ode_state_dtype='float16'), (2, 3, 16, 16))
  with pytest.raises(ValueError, match=r"sampling.precision 'fp16'; valid: \['fp32', 'bf16'\]"):
    sampling.sampler_settings(tiny_config(precision='fp16'))  # Before any manifest is written.


# ---------------------------------------------------------------------------------------------------------------
# What the manifests record.

def test_sampler_settings_record_state_dtype_and_precision_only_when_not_default():
  assert set(sampling.sampler_settings(tiny_config())) == LEGACY_SETTINGS
  assert set(sampling.sampler_settings(tiny_config(cuda_graph=False))) == LEGACY_SETTINGS
  settings = sampling.sampler_settings(tiny_config(ode_state_dtype='float64', precision='bf16'))
  assert settings['ode_state_dtype'] == 'float64' and settings['precision'] == 'bf16'
  assert set(settings) == LEGACY_SETTINGS | {'ode_state_dtype', 'precision'}


def test_evaluation_folders_of_the_defaults_stay_valid_and_refuse_other_settings(tmp_path):
  config = tiny_config()
  legacy = {'checkpoint_sha256': 'abc', 'seed': 0, **{key: sampling.sampler_settings(config)[key]
                                                      for key in LEGACY_SETTINGS}}
  (tmp_path / 'manifest.json').write_text(json.dumps(legacy))  # As written before the new settings existed.
  evaluation.SampleRounds(str(tmp_path), {'checkpoint_sha256': 'abc', 'seed': 0, **sampling.sampler_settings(config)})
  for key, value in (('ode_state_dtype', 'float64'), ('precision', 'bf16')):
    other = tiny_config(**{key: value})
    with pytest.raises(ValueError, match=f"{key}: None there, '{value}' now"):
      evaluation.SampleRounds(str(tmp_path), {'checkpoint_sha256': 'abc', 'seed': 0,
                                              **sampling.sampler_settings(other)})


def test_pair_folders_of_the_defaults_stay_valid_and_refuse_other_settings(tmp_path):
  def settings(config):
    return {'teacher': 'teacher.pth', 'pair_format': 'float32', 'image_shape': [3, 16, 16],
            **sampling.sampler_settings(config)}

  reflow_pairs.PairShardWriter(str(tmp_path), 0, settings(tiny_config()), 8, 4)
  reflow_pairs.PairShardWriter(str(tmp_path), 0, settings(tiny_config(cuda_graph=False)), 8, 4)
  with pytest.raises(ValueError, match="precision: None there, 'bf16' now"):
    reflow_pairs.PairShardWriter(str(tmp_path), 0, settings(tiny_config(precision='bf16')), 8, 4)


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: an exact pass-through on the CPU.

def test_graphed_velocity_is_an_exact_pass_through_on_the_cpu():
  calls = []

  def velocity(x, t):
    calls.append((x, t))
    return x * t.reshape(-1, 1)

  graphed = cuda_graphs.GraphedVelocity(velocity)
  x, t = torch.randn(3, 5), torch.rand(3)
  with torch.no_grad():
    out = graphed(x, t)
  assert len(calls) == 1 and calls[0][0] is x and calls[0][1] is t
  assert torch.equal(out, x * t.reshape(-1, 1))
  assert graphed.captures == 0 and graphed.replays == 0 and not graphed.graphs


@pytest.mark.parametrize('sampler', ['euler', 'rk45'])
def test_cpu_samples_are_the_same_with_and_without_cuda_graph(sampler):
  config = tiny_config(use_ode_sampler=sampler, ode_tol=1e-2)
  flow = tiny_flow(config)
  noise = noise_batch(config)
  on, off = sample(config, flow, noise, cuda_graph=True), sample(config, flow, noise, cuda_graph=False)
  assert torch.equal(on.x, off.x) and on.nfe == off.nfe


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs on CUDA.

class RecordedGraphedVelocity(cuda_graphs.GraphedVelocity):
  """A ``GraphedVelocity`` that keeps a list of its instances, so a test can read the sampler's captures."""

  instances = []

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    RecordedGraphedVelocity.instances.append(self)


@pytest.fixture()
def recorded_graphs(monkeypatch):
  RecordedGraphedVelocity.instances = []
  monkeypatch.setattr(cuda_graphs, 'GraphedVelocity', RecordedGraphedVelocity)
  return RecordedGraphedVelocity.instances


@requires_cuda
@pytest.mark.parametrize('sampler', ['euler', 'rk45'])
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_graphed_samplers_equal_eager_on_cuda(recorded_graphs, sampler, precision):
  config = tiny_config(use_ode_sampler=sampler, precision=precision)
  flow = tiny_flow(config, device='cuda')
  noise = noise_batch(config, batch=4, device='cuda')
  eager = sample(config, flow, noise, cuda_graph=False)
  graphed = sample(config, flow, noise, cuda_graph=True)
  assert (graphed.x - eager.x).abs().max().item() <= 1e-5
  assert graphed.contributing_nfe == eager.contributing_nfe
  assert [g.enabled for g in recorded_graphs] == [False, True]
  assert recorded_graphs[0].captures == 0 and recorded_graphs[1].captures == 1
  assert recorded_graphs[1].replays == graphed.nfe


@requires_cuda
def test_a_graph_is_reused_for_its_shape_and_captured_again_for_a_new_one(recorded_graphs):
  config = tiny_config(use_ode_sampler='rk45')
  flow = tiny_flow(config, device='cuda')
  noise = noise_batch(config, batch=4, device='cuda')
  sample_fn = sampling.get_sampling_fn(config, noise.shape)
  first, second = sample_fn(flow, noise=noise), sample_fn(flow, noise=noise)
  graphed = recorded_graphs[0]
  assert graphed.captures == 1 and graphed.replays == first.nfe + second.nfe
  assert torch.equal(first.x, second.x)
  smaller = noise[:2]
  part = sample_fn(flow, noise=smaller)
  assert graphed.captures == 2 and len(graphed.graphs) == 2
  assert (part.x - sample(config, flow, smaller, cuda_graph=False).x).abs().max().item() <= 1e-5
  sample_fn(flow, noise=noise)
  assert graphed.captures == 2  # Both shapes keep their graphs.


@requires_cuda
def test_graphs_follow_weights_copied_in_place_and_recapture_after_reallocation(recorded_graphs):
  config = tiny_config(use_ode_sampler='euler')
  flow = tiny_flow(config, device='cuda')
  noise = noise_batch(config, batch=4, device='cuda')
  sample_fn = sampling.get_sampling_fn(config, noise.shape)
  before = sample_fn(flow, noise=noise).x
  params = [p for p in flow.parameters() if p.requires_grad]
  ema = models.ExponentialMovingAverage(params, decay=0.9)
  with torch.no_grad():
    for shadow in ema.shadow_params:
      shadow.mul_(0.5).add_(0.01)
  graphed = recorded_graphs[0]
  with ema.average_parameters(params):  # EMA weights copied in with copy_: the same memory, no recapture.
    swapped = sample_fn(flow, noise=noise).x
    expected = sample(config, flow, noise, cuda_graph=False).x
  assert graphed.captures == 1
  assert (swapped - before).abs().max().item() > 1e-3
  assert (swapped - expected).abs().max().item() <= 1e-5
  assert (sample_fn(flow, noise=noise).x - before).abs().max().item() <= 1e-5  # Raw weights restored in place.

  weight = [m for m in flow.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight  # The output convolution.
  weight.data = torch.randn_like(weight) * 0.1  # New memory: the graph must not keep reading the old one.
  reallocated = sample_fn(flow, noise=noise).x
  assert graphed.captures == 2
  assert (reallocated - sample(config, flow, noise, cuda_graph=False).x).abs().max().item() <= 1e-5
  assert (reallocated - before).abs().max().item() > 1e-3


@requires_cuda
def test_graphed_velocity_is_bypassed_with_autograd_on():
  config = tiny_config()
  flow = tiny_flow(config, device='cuda')
  graphed = cuda_graphs.GraphedVelocity(sampling.network_velocity(flow), module=flow)
  x = noise_batch(config, batch=2, device='cuda')
  t = torch.full((2,), 0.5, device='cuda')
  out = graphed(x, t)
  assert graphed.captures == 0 and out.requires_grad
