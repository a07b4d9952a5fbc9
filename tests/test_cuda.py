"""The device code paths on CUDA: the fast step against the fp32 eager step (also with labels, bf16 and the fused
norm inside a captured update), online reflow, no host read inside an update, the default step's loss curve, exact
resume, RK45 (also guided, from CUDA graphs) against the CPU, device-resident batches against the loader; MeanFlow's
loss and gradients against the CPU (fp32, bf16), its resume, and its sampler replayed from CUDA graphs; the DiT's
losses and gradients against the CPU with SDPA's fused kernels (also under MeanFlow) and its graph-captured step.

Every comparison moves tensors to the CPU. The module is skipped with a reason where CUDA is absent; on one H100 it
takes under 3 minutes:

  python -m pytest -q -rs tests/test_cuda.py
"""
import contextlib
import copy
import json
import logging

import numpy as np
import pytest
import torch

import datasets
import distributed
import losses
import models
import run_lib
import sampling
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as demo_config
from datasets import ResidentBatches, dataset_tensor, endless_batches, streams
from datasets.digits import TensorImages
from speed import cuda_graphs
from speed.dispatch_census import DispatchCensus
from tests.helpers import flat_state, tiny_digits_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs CUDA (torch.cuda.is_available() is False): these tests run the training '
                                       'step, resume, RK45 and device-resident data on a GPU')


@pytest.fixture(autouse=True)
def _restore_process_settings(monkeypatch):
  """``run_lib.configure_backends`` sets process-wide TF32 and cuDNN flags and ``select_device`` the process's
  device: every test here leaves them as it found them."""
  monkeypatch.setattr(distributed, '_device', None)
  saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
           torch.backends.cudnn.deterministic)
  yield
  (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
   torch.backends.cudnn.deterministic) = saved


@pytest.fixture()
def deterministic_cudnn(monkeypatch):
  """cuDNN's deterministic algorithms without autotuning, also inside ``run_lib.train`` (whose
  ``configure_backends`` turns autotuning on): two runs then choose the same convolution algorithms."""
  configure = run_lib.configure_backends

  def configure_deterministically(config, device):
    configure(config, device)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

  monkeypatch.setattr(run_lib, 'configure_backends', configure_deterministically)
  torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True


def cuda_config(**training):
  """The tiny digits model (tests/helpers.py: tiny_digits_config) on the GPU, without snapshot sample grids."""
  config = tiny_digits_config(**training)
  config.device = 'cuda'
  config.training.snapshot_sampling = False
  return config


def state_group(key):
  """'param', 'ema' or 'adam.<moment>' of a ``flat_state`` key."""
  kind = key.split('.')
  return f'adam.{kind[2]}' if kind[0] == 'adam' else kind[0]


def assert_states_close(expected, actual, rtol):
  """Parameters, EMA shadows and each Adam state (step, moments) of ``actual`` within ``rtol`` of ``expected``
  relative to the largest |value| of their group, compared on the CPU; ``rtol`` is one number or one per group.

  Per group, not per entry: Adam divides by sqrt(v), so an entry whose gradient is rounding noise (a bias before a
  GroupNorm has gradient 0 in exact arithmetic; cancellation leaves ~1e-16) moves by noise of its own size, and two
  correct updates differ there by 100% of the entry. A wrong update (a skipped step, another bias correction or lr,
  the EMA applied or not) moves whole tensors by about lr, 1e-3 of the group's scale.
  """
  assert expected.keys() == actual.keys()
  errors, scales = {}, {}
  for key in expected:
    want, got = expected[key].cpu().double(), actual[key].cpu().double()
    group = state_group(key)
    error = (got - want).abs().max().item()
    if error >= errors.get(group, (-1.0, ''))[0]:
      errors[group] = (error, key)
    scales[group] = max(scales.get(group, 0.0), want.abs().max().item())
  for group, (error, key) in errors.items():
    bound = rtol[group] if isinstance(rtol, dict) else rtol
    assert error <= bound * scales[group], (f'{group}: max |difference| {error:.3g} (in {key}) > {bound:g} x the '
                                            f'largest |value| {scales[group]:.3g}')


def logged_losses(workdir):
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['training_loss']) for r in records if 'training_loss' in r]


# ---------------------------------------------------------------------------------------------------------------
# The fast step against the fp32 eager step.

def train_n_updates(workdir, updates, **settings):
  """State after ``updates`` updates of the tiny model on CUDA in fp32 with TF32 off; ``settings``: 'section.key':
  value."""
  config = cuda_config(n_iters=updates, snapshot_freq=100, snapshot_freq_for_preemption=updates)
  config.training.precision, config.training.allow_tf32 = 'fp32', False
  for name, value in settings.items():
    section, key = name.split('.')
    config[section][key] = value
  return run_lib.train(config, str(workdir))


def test_the_fused_step_equals_the_unfused_fp32_step(tmp_path, deterministic_cudnn):
  """Fused Adam (its found_inf skip, the EMA's apply flag: no host read) against the unfused Adam that reads the
  host, on the same batches, noise and dropout: weights, EMA and Adam state agree to float rounding."""
  fused = train_n_updates(tmp_path / 'fused', 3, **{'optim.fused': True})
  unfused = train_n_updates(tmp_path / 'unfused', 3, **{'optim.fused': False})
  assert losses.skips_updates_on_device(fused['optimizer'])
  assert not losses.skips_updates_on_device(unfused['optimizer'])
  assert fused['step'] == unfused['step'] == 3 and fused['ema'].num_updates == unfused['ema'].num_updates == 3
  assert_states_close(flat_state(unfused), flat_state(fused), rtol=1e-5)
  run_lib.seed_everything(cuda_config().seed)
  initial = flat_state(losses.build_training_state(cuda_config(), torch.device('cpu')))
  assert not torch.equal(initial['param.0'], flat_state(fused)['param.0'].cpu())  # It trained.


def record_graphed_steps(monkeypatch):
  """The ``cuda_graphs.GraphedTrainStep`` objects that ``run_lib.train`` makes from now on, in a list."""
  made = []

  class Recorded(cuda_graphs.GraphedTrainStep):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(cuda_graphs, 'GraphedTrainStep', Recorded)
  return made


def test_the_graph_captured_step_equals_the_eager_step(tmp_path, deterministic_cudnn, monkeypatch):
  """3 eager warm-up updates, then 3 replays of the captured update (forward, backward, clipping, fused Adam, EMA,
  noise and times from the registered path generator, dropout) against 6 eager updates. The captured Adam reads
  its lr from a float32 tensor (fused kernels read a float), the eager one a Python float: rounding apart, equal."""
  made = record_graphed_steps(monkeypatch)
  updates = 6
  graphed = train_n_updates(tmp_path / 'graphed', updates, **{'training.cuda_graph': True})
  assert len(made) == 1 and made[0].eager_updates == 3 and made[0].replays == updates - 3
  eager = train_n_updates(tmp_path / 'eager', updates, **{'training.cuda_graph': False})
  assert len(made) == 1
  assert graphed['step'] == eager['step'] == updates and graphed['ema'].num_updates == updates
  assert_states_close(flat_state(eager), flat_state(graphed), rtol=1e-5)
  assert [step for step, _ in logged_losses(tmp_path / 'graphed')] == list(range(1, updates + 1))
  np.testing.assert_allclose([loss for _, loss in logged_losses(tmp_path / 'graphed')],
                             [loss for _, loss in logged_losses(tmp_path / 'eager')], rtol=1e-5)


def test_a_graph_captured_run_resumes_like_an_uninterrupted_one(tmp_path, deterministic_cudnn, monkeypatch):
  """10 graphed updates against 5, then a restart to 10 (which warms up and captures again): the path generator's
  state saved after replays, the in-place EMA, Adam and skipped-update counters, and the checkpoint's float lr must
  all be right for the two to agree."""
  made = record_graphed_steps(monkeypatch)

  def config(n_iters):
    return cuda_config(n_iters=n_iters, snapshot_freq=100, snapshot_freq_for_preemption=5, cuda_graph=True)

  uninterrupted = flat_state(run_lib.train(config(10), str(tmp_path / 'a')))
  run_lib.train(config(5), str(tmp_path / 'b'))
  resumed_state = run_lib.train(config(10), str(tmp_path / 'b'))
  assert [m.replays for m in made] == [7, 2, 2]
  assert resumed_state['step'] == 10
  assert_states_close(uninterrupted, flat_state(resumed_state), rtol=1e-5)
  np.testing.assert_allclose([loss for _, loss in logged_losses(tmp_path / 'b')],
                             [loss for _, loss in logged_losses(tmp_path / 'a')], rtol=1e-5)


# Two bf16 computations of the same 3 updates (``assert_states_close`` groups). A gradient entry of the one differs
# from the other's by at most about one bf16 rounding, 2^-8 relative (8 bits of mantissa): the first moments may
# differ by 2^-8 of their scale and the second (squares) by 2^-7, while a skipped, repeated or wrongly scaled update
# moves them by far more (beta1 = 0.9: one update moves m by 0.1 (g - m); v holds one g^2 per update). The weights
# cannot be held to that: Adam moves an entry by about lr whatever its gradient's size, so an entry whose gradient
# is bf16 rounding noise (a bias before a GroupNorm, a zero-initialised last convolution) takes a full step of random
# sign. Bias-corrected Adam moves an entry by at most 1.004 lr in each of its first three updates (|m_hat| /
# sqrt(v_hat), by Cauchy-Schwarz), so with the warm-up's lr of 0, 5e-4 and 1e-3 two correct runs differ by at most
# 2 x 1.51e-3 = 3.0e-3 of the weights' scale 1 (GroupNorm weights): the weights and their EMA (convex combinations
# of them) are held to that, which only a step larger than Adam's (lr, warm-up, bias correction) passes.
BF16_RTOL = {'adam.step': 0.0, 'adam.exp_avg': 2 ** -8, 'adam.exp_avg_sq': 2 ** -7, 'param': 3.1e-3, 'ema': 3.1e-3}


@pytest.mark.parametrize('precision, channels_last', [('fp32', False), ('bf16', True)])
def test_the_fused_norm_step_follows_the_eager_step(tmp_path, deterministic_cudnn, precision, channels_last):
  """model.fused_norm (GroupNorm + SiLU compiled into one kernel) against the eager pair, 3 updates: fp32 to float
  rounding; bf16 channels_last within bf16's (``BF16_RTOL``: the two round at different places)."""
  settings = {'training.precision': precision, 'training.channels_last': channels_last}
  fused = train_n_updates(tmp_path / 'fused', 3, **settings, **{'model.fused_norm': True})
  eager = train_n_updates(tmp_path / 'eager', 3, **settings, **{'model.fused_norm': False})
  assert any(getattr(m, 'fused_norm', False) for m in fused['model'].modules())
  assert_states_close(flat_state(eager), flat_state(fused), rtol=1e-5 if precision == 'fp32' else BF16_RTOL)


def test_a_class_conditional_graph_captured_step_equals_the_eager_step(tmp_path, deterministic_cudnn, monkeypatch):
  """Labels through the captured update: the labels of each batch are copied into the graph's static input and
  the label dropout is drawn from the registered path generator inside it; 6 updates (3 replays) against 6 eager
  ones of the class-conditional tiny model."""
  made = record_graphed_steps(monkeypatch)
  conditional = {'model.num_classes': 10, 'training.label_dropout': 0.5}
  graphed = train_n_updates(tmp_path / 'graphed', 6, **conditional, **{'training.cuda_graph': True})
  eager = train_n_updates(tmp_path / 'eager', 6, **conditional, **{'training.cuda_graph': False})
  assert len(made) == 1 and made[0].replays == 3 and made[0]._labels is not None
  assert hasattr(graphed['model'], 'label_embedding')
  assert_states_close(flat_state(eager), flat_state(graphed), rtol=1e-5)


def test_a_bf16_graph_captured_step_follows_the_eager_bf16_step(tmp_path, deterministic_cudnn, monkeypatch):
  """bf16 autocast inside the captured update (its casts are kernels of the graph) against eager bf16 updates:
  within bf16's rounding (``BF16_RTOL``), 6 updates of which 3 are replays."""
  made = record_graphed_steps(monkeypatch)
  bf16 = {'training.precision': 'bf16'}
  graphed = train_n_updates(tmp_path / 'graphed', 6, **bf16, **{'training.cuda_graph': True})
  eager = train_n_updates(tmp_path / 'eager', 6, **bf16, **{'training.cuda_graph': False})
  assert len(made) == 1 and made[0].replays == 3
  assert_states_close(flat_state(eager), flat_state(graphed), rtol=BF16_RTOL)


def test_the_fused_norm_inside_a_captured_step_follows_the_eager_step(tmp_path, deterministic_cudnn, monkeypatch):
  """model.fused_norm with training.cuda_graph: the compiled GroupNorm + SiLU kernels (compiled in the eager
  warm-up updates) replayed from the graph, against the eager unfused step in fp32, to float rounding."""
  made = record_graphed_steps(monkeypatch)
  fused = train_n_updates(tmp_path / 'fused', 6, **{'model.fused_norm': True, 'training.cuda_graph': True})
  eager = train_n_updates(tmp_path / 'eager', 6, **{'model.fused_norm': False, 'training.cuda_graph': False})
  assert len(made) == 1 and made[0].replays == 3
  assert any(getattr(m, 'fused_norm', False) for m in fused['model'].modules())
  assert_states_close(flat_state(eager), flat_state(fused), rtol=1e-5)


def test_online_reflow_trains_on_cuda_with_device_resident_data(tmp_path, deterministic_cudnn):
  """Online reflow with the defaults (data.device_resident on: the data generator, from which the pairs' noise is
  drawn, lives on the GPU) starts and trains: 2 updates of a class-conditional student with a guided teacher."""
  teacher = cuda_config(n_iters=1, snapshot_freq=1, snapshot_freq_for_preemption=1)
  teacher.model.num_classes = 10
  run_lib.train(teacher, str(tmp_path / 'teacher'))
  config = cuda_config(n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=2)
  config.model.num_classes = 10
  assert config.data.device_resident
  config.reflow.reflow_type = 'train_online_reflow'
  config.reflow.online_teacher_steps = 2
  config.reflow.teacher_guidance_scale = 2.0
  config.reflow.last_flow_ckpt = str(tmp_path / 'teacher' / 'checkpoints' / 'checkpoint_1.pth')
  state = run_lib.reflow(config, str(tmp_path / 'student'))
  assert state['step'] == 2
  assert all(torch.isfinite(p).all() for p in state['model'].parameters())
  assert [step for step, _ in logged_losses(tmp_path / 'student')] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# No host read inside an update.

def cuda_update(config):
  """``update()``: one update of ``config`` as the training loop makes it on CUDA: the next global batch from the
  device-resident images (gathered, flipped and scaled on the device), then ``losses.get_step_fn``'s step."""
  device = run_lib.select_device(config)
  run_lib.configure_backends(config, device)
  run_lib.seed_everything(config.seed)
  state = losses.build_training_state(config, device)
  flow = losses.build_rectified_flow(config, state['model'])
  step = losses.get_step_fn(config, losses.get_loss_fn(config, flow), list(state['model'].parameters()),
                            state['optimizer'], state['ema'], train=True, device=device,
                            generator=torch.Generator(device).manual_seed(config.seed + 2))
  batches = streams.data_batches(config, 0, device, streams.data_generator_for(config, device))
  return lambda: step(state, [next(batches) for _ in range(config.training.grad_accum_steps)])


@pytest.mark.parametrize('precision, accumulation', [('fp32', 1), ('bf16', 1), ('fp32', 2)])
def test_an_update_on_cuda_makes_no_host_read(precision, accumulation):
  """DispatchCensus counts a copy from the GPU into host memory as a host read, as well as .item() and the
  operators whose output shape depends on the data."""
  config = cuda_config()
  config.training.precision, config.training.grad_accum_steps = precision, accumulation
  assert config.optim.fused and config.data.device_resident  # The defaults under test.
  update = cuda_update(config)
  update()  # Warm-up: Adam's state, the epoch's permutation on the device, cuDNN's choices.
  with DispatchCensus() as census:
    update()
  assert census.total > 100 and census.total_host_reads == 0, dict(census.host_reads)


def test_the_training_loop_on_cuda_reads_the_host_only_when_it_logs(tmp_path):
  """Host reads of a 16-update run minus those of an 8-update run (a log every 8 updates, a checkpoint at the end of
  each): the 8 extra updates cost one log (the loss and the skipped-update counter), nothing per update."""

  def host_reads(n_iters):
    config = cuda_config(n_iters=n_iters, log_freq=8, eval_freq=10 ** 6, snapshot_freq=n_iters,
                         snapshot_freq_for_preemption=n_iters)
    with DispatchCensus() as census:
      run_lib.train(config, str(tmp_path / str(n_iters)))
    return census.total_host_reads

  assert host_reads(16) - host_reads(8) <= 2


# ---------------------------------------------------------------------------------------------------------------
# The default step's loss curve.

def demo_losses(workdir, **training):
  """Training losses of the first 200 updates of the digits demo on CUDA, one per update."""
  config = demo_config()
  config.device = 'cuda'
  config.training.update(n_iters=200, log_freq=1, eval_freq=10 ** 6, snapshot_freq=200,
                         snapshot_freq_for_preemption=200, snapshot_sampling=False, **training)
  run_lib.train(config, str(workdir))
  steps, values = zip(*logged_losses(workdir))
  assert list(steps) == list(range(1, 201))
  return np.array(values)


def test_the_default_step_follows_the_fp32_loss_curve(tmp_path):
  """As benchmarks/precision_curve.py: the same seed, data and noise with the config's defaults on CUDA and with
  fp32 without TF32; over updates 101-200 the mean losses differ by less than 3 standard errors of the fp32 mean."""
  default = demo_losses(tmp_path / 'default')
  fp32 = demo_losses(tmp_path / 'fp32', precision='fp32', allow_tf32=False)
  window = slice(100, 200)
  standard_error = fp32[window].std(ddof=1) / np.sqrt(len(fp32[window]))
  difference = default[window].mean() - fp32[window].mean()
  assert abs(difference) < 3 * standard_error, (
      f'mean loss of updates 101-200: defaults {default[window].mean():.5f}, fp32 {fp32[window].mean():.5f} '
      f'({difference / standard_error:+.1f} standard errors)')
  assert fp32[window].mean() < 0.5 * fp32[:50].mean() and default[window].mean() < 0.5 * default[:50].mean()


# ---------------------------------------------------------------------------------------------------------------
# Resume.

def test_an_interrupted_and_resumed_run_on_cuda_equals_an_uninterrupted_one(tmp_path, deterministic_cudnn):
  """As tests/test_train.py on the CPU, with device-resident data: 4 updates against 2, then a restart to 4. Bit for
  bit where two uninterrupted runs are bit for bit the same on this GPU, else within 1e-6."""

  def config(n_iters):
    c = cuda_config(n_iters=n_iters, snapshot_freq=100, snapshot_freq_for_preemption=2)
    c.data.device_resident = True
    return c

  uninterrupted = flat_state(run_lib.train(config(4), str(tmp_path / 'a')))
  repeated = flat_state(run_lib.train(config(4), str(tmp_path / 'again')))
  run_lib.train(config(2), str(tmp_path / 'b'))
  resumed_state = run_lib.train(config(4), str(tmp_path / 'b'))
  assert resumed_state['step'] == 4
  resumed = flat_state(resumed_state)
  assert uninterrupted.keys() == resumed.keys()
  assert [step for step, _ in logged_losses(tmp_path / 'b')] == [1, 2, 3, 4]  # Steps 3-4 came from the restart.
  if all(torch.equal(uninterrupted[key], repeated[key]) for key in uninterrupted):
    for key in uninterrupted:
      assert torch.equal(uninterrupted[key].cpu(), resumed[key].cpu()), key
    assert logged_losses(tmp_path / 'b') == logged_losses(tmp_path / 'a')
  else:
    assert_states_close(uninterrupted, resumed, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# RK45 on CUDA against the CPU.

def sampling_config(**sampling_options):
  """The tiny DDPM++ with every block's last layer initialised like the others (model.init_scale 1, as
  benchmarks/sampling_speed.py --init-scale 1): a field far from constant, which RK45 crosses in hundreds of calls."""
  config = tiny_digits_config()
  config.model.init_scale = 1.0
  config.sampling.use_ode_sampler, config.sampling.ode_tol = 'rk45', 1e-5
  for key, value in sampling_options.items():
    assert key in config.sampling, f'sampling.{key} is not a config key (renamed or removed?)'
    config.sampling[key] = value
  return config


@pytest.fixture(scope='module')
def rk45_on_the_cpu():
  """(network, noise, RK45 solution on the CPU): the reference of the CUDA solves, made once."""
  config = sampling_config(precision='fp32', cuda_graph=False)
  torch.manual_seed(0)
  net = models.create_model(config).eval()
  shape = (4, config.data.num_channels, config.data.image_size, config.data.image_size)
  noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * config.sampling.init_noise_scale
  return net, noise, sampling.get_sampling_fn(config, shape)(losses.build_rectified_flow(config, net), noise=noise)


@pytest.mark.parametrize('cuda_graph', [False, True])
def test_rk45_on_cuda_matches_the_cpu(rk45_on_the_cpu, cuda_graph):
  """The same network and noise, fp32 network calls with TF32 off: the CUDA solve (eager, or replayed from a CUDA
  graph) ends within 1e-3 of the CPU solve with an NFE within 10% of it."""
  net, noise, on_cpu = rk45_on_the_cpu
  config = sampling_config(precision='fp32', cuda_graph=cuda_graph)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  flow = losses.build_rectified_flow(config, copy.deepcopy(net).cuda())
  on_cuda = sampling.get_sampling_fn(config, noise.shape)(flow, noise=noise.cuda())
  assert on_cuda.x.device.type == 'cuda'
  assert on_cpu.contributing_nfe > 50  # Not the near-constant field of an untrained DDPM++ (8 NFE).
  difference = (on_cuda.x.cpu() - on_cpu.x).abs().max().item()
  assert difference < 1e-3, f'max |x1 CUDA - x1 CPU| = {difference:.3g}'
  assert abs(on_cuda.contributing_nfe - on_cpu.contributing_nfe) <= 0.1 * on_cpu.contributing_nfe, (
      on_cuda.contributing_nfe, on_cpu.contributing_nfe)


@pytest.mark.parametrize('cuda_graph', [False, True])
def test_guided_rk45_on_cuda_matches_the_cpu(cuda_graph):
  """Labels and classifier-free guidance (w = 2 where t >= 0.5: every call evaluates the doubled batch and a
  per-sample torch.where picks the guided velocity inside the interval, so one graph serves every t) through the
  sampler's network call, eager and replayed from CUDA graphs: the CUDA solve ends within 1e-3 of the CPU solve,
  and the graphed one within 1e-5 of the eager one."""
  config = sampling_config(precision='fp32', cuda_graph=False, guidance_scale=2.0, guidance_t_min=0.5)
  config.model.num_classes = 10
  torch.manual_seed(0)
  net = models.create_model(config).eval()
  shape = (4, config.data.num_channels, config.data.image_size, config.data.image_size)
  noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
  labels = torch.tensor([0, 3, 7, 9])
  on_cpu = sampling.get_sampling_fn(config, shape)(losses.build_rectified_flow(config, net), noise=noise,
                                                   labels=labels)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  flow = losses.build_rectified_flow(config, copy.deepcopy(net).cuda())
  eager = sampling.get_sampling_fn(config, shape)(flow, noise=noise.cuda(), labels=labels.cuda())
  config.sampling.cuda_graph = cuda_graph
  on_cuda = sampling.get_sampling_fn(config, shape)(flow, noise=noise.cuda(), labels=labels.cuda())
  difference = (on_cuda.x.cpu() - on_cpu.x).abs().max().item()
  assert difference < 1e-3, f'max |x1 CUDA - x1 CPU| = {difference:.3g}'
  assert (on_cuda.x - eager.x).abs().max().item() <= 1e-5
  assert on_cuda.contributing_nfe == eager.contributing_nfe
  assert abs(on_cuda.contributing_nfe - on_cpu.contributing_nfe) <= 0.1 * on_cpu.contributing_nfe


# ---------------------------------------------------------------------------------------------------------------
# Device-resident batches against the loader.

@pytest.mark.parametrize('start_batch', [0, 24])
def test_the_training_stream_on_cuda_yields_the_loaders_batches(start_batch):
  """streams.training_stream with data.device_resident on CUDA against the data loader on the CPU: the digits demo's
  1,617 training images (float: resized), global batch 64, over an epoch boundary (after 25.3 batches)."""
  resident_config, loader_config = demo_config(), demo_config()
  loader_config.data.device_resident = False
  dataset = datasets.get_dataset(resident_config, train=True)
  resident = streams.training_stream(resident_config, dataset, start_batch, torch.device('cuda'),
                                     resident_config.seed, resident=True)
  loader = streams.training_stream(loader_config, dataset, start_batch, torch.device('cpu'), loader_config.seed,
                                   resident=True)
  for _ in range(30):
    (_, on_cuda, cuda_rows, _), (_, on_cpu, cpu_rows, _) = next(resident), next(loader)
    assert on_cuda.device.type == 'cuda' and on_cpu.device.type == 'cpu'
    assert cuda_rows == cpu_rows and torch.equal(on_cuda.cpu(), on_cpu)


@pytest.mark.parametrize('world, rank, micro_batch, start_batch', [(1, 0, 6, 0), (2, 1, 3, 5)])
def test_resident_8_bit_batches_on_cuda_are_the_loaders_batches(world, rank, micro_batch, start_batch):
  """8-bit images (as CIFAR-10's) are held as uint8 on the GPU and turned into floats there by a lookup in a table of
  true quotients, not CUDA's division (tensor / 255 is tensor * (1 / 255) there, one ulp off for 126 levels): bit
  for bit the loader's float images k / 255, for any rank, micro-batch and resume point, across epochs (37 images,
  batch 6)."""
  levels = torch.randint(0, 256, (37, 3, 4, 4), generator=torch.Generator().manual_seed(0))
  dataset = TensorImages(levels.float() / 255.0)
  stored, _ = dataset_tensor(dataset)
  assert stored.dtype == torch.uint8
  order = dict(seed=3, start_batch=start_batch, micro_batch=micro_batch, rank=rank, world=world)
  loader = endless_batches(dataset, 6, **order)
  resident = iter(ResidentBatches(stored.cuda(), 6, **order))
  for _ in range(40):
    on_cuda, on_cpu = next(resident).x1, next(loader).x1
    assert on_cuda.device.type == 'cuda'
    difference = (on_cuda.cpu() - on_cpu).abs().max().item()
    assert torch.equal(on_cuda.cpu(), on_cpu), f'max |difference| {difference:.3g}'


# ---------------------------------------------------------------------------------------------------------------
# MeanFlow (training.objective = 'meanflow') on CUDA.

def meanflow_cuda_config(updates, **settings):
  config = cuda_config(n_iters=updates, snapshot_freq=100, snapshot_freq_for_preemption=updates)
  config.training.objective, config.model.time_inputs = 'meanflow', 2
  config.meanflow.interval_fraction = 0.5
  config.sampling.use_ode_sampler, config.sampling.sample_N = 'mean_flow', 2
  config.training.precision, config.training.allow_tf32 = 'fp32', False
  for name, value in settings.items():
    section, key = name.split('.')
    config[section][key] = value
  return config


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_the_meanflow_loss_on_cuda_matches_the_cpu(precision):
  """The library's MeanFlow loss (the forward-mode pass and its target) on the same network, data, noise and (t, s)
  pairs: on CUDA in fp32 (TF32 off) within 1e-4 of the CPU, under bf16 autocast within 5% of it; the gradients
  agree as closely."""
  config = meanflow_cuda_config(1)
  torch.manual_seed(0)
  net = models.create_model(config).eval()
  with torch.no_grad():
    for p in net.parameters():  # Away from the near-zero output layers of the initialisation.
      p.add_(torch.randn_like(p) * 0.05)
  generator = torch.Generator().manual_seed(1)
  x1 = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1
  noise = torch.randn(x1.shape, generator=generator)
  times, end_times = losses.build_flow(config, net).sample_time_pairs(8, generator=generator)
  results = {}
  for device in ('cpu', 'cuda'):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = copy.deepcopy(net).to(device)
    flow = losses.build_flow(config, model)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == 'bf16' and device == 'cuda'):
      loss = flow(x1.to(device), noise=noise.to(device), times=times.to(device), end_times=end_times.to(device))
    loss.backward()
    results[device] = (loss.detach().cpu(), [p.grad.cpu() for p in model.parameters()])
  tolerance = 1e-4 if precision == 'fp32' else 5e-2
  torch.testing.assert_close(results['cuda'][0], results['cpu'][0], rtol=tolerance, atol=0)
  for cuda_grad, cpu_grad in zip(results['cuda'][1], results['cpu'][1]):
    assert (cuda_grad - cpu_grad).abs().max() <= tolerance * max(cpu_grad.abs().max(), 1e-6) + 1e-6


def test_a_meanflow_run_on_cuda_trains_resumes_and_ignores_the_cuda_graph_option(tmp_path, deterministic_cudnn,
                                                                                 caplog):
  """4 updates equal 2 + a restart + 2 on CUDA; training.cuda_graph is ignored for a MeanFlow (logged), not an
  error."""
  caplog.set_level(logging.INFO)
  uninterrupted = run_lib.train(meanflow_cuda_config(4, **{'training.cuda_graph': True}), str(tmp_path / 'a'))
  run_lib.train(meanflow_cuda_config(2, **{'training.cuda_graph': True}), str(tmp_path / 'b'))
  resumed = run_lib.train(meanflow_cuda_config(4, **{'training.cuda_graph': True}), str(tmp_path / 'b'))
  assert_states_close(flat_state(uninterrupted), flat_state(resumed), rtol=1e-5)
  assert all(torch.isfinite(p).all() for p in resumed['model'].parameters())
  assert "training.cuda_graph is on but not used: training.objective='meanflow'" in caplog.text


@pytest.mark.parametrize('steps', [1, 2])
def test_the_mean_flow_sampler_replayed_from_a_cuda_graph_equals_the_eager_one(steps):
  config = meanflow_cuda_config(1, **{'sampling.sample_N': steps})
  torch.manual_seed(0)
  net = models.create_model(config).cuda().eval()
  flow = losses.build_flow(config, net)
  noise = torch.randn(4, 1, 16, 16, device='cuda')
  samples = {}
  for graphed in (False, True):
    config.sampling.cuda_graph = graphed
    samples[graphed] = sampling.get_sampling_fn(config, noise.shape)(flow, noise=noise).x
  torch.testing.assert_close(samples[True], samples[False], rtol=1e-5, atol=1e-5)
  torch.testing.assert_close(samples[False], flow.sample(noise=noise, steps=steps), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The DiT (model.name = 'dit') on CUDA: attention by SDPA's fused kernels, in the graphed step and under MeanFlow.

DIT_KEYS = ('name', 'patch_size', 'dit_size', 'dit_depth', 'dit_hidden_size', 'dit_num_heads')


def dit_settings():
  """The digits demo's DiT (4 blocks of width 128, 4 heads of 32 channels, 64 tokens) as ``train_n_updates``
  settings."""
  from configs.rectified_flow.digits_dit_demo import get_config as digits_dit_config

  demo = digits_dit_config().model
  return {f'model.{key}': demo[key] for key in DIT_KEYS}


@pytest.mark.parametrize('objective', ['rectified_flow', 'meanflow'])
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_the_dit_loss_and_gradients_on_cuda_match_the_cpu(objective, precision):
  """The rectified-flow and MeanFlow losses of the digits DiT (its parameters moved off adaLN-Zero's zeros) on the
  same data, noise and times: on CUDA in fp32 (TF32 off; SDPA's memory-efficient kernel) within 1e-4 of the CPU,
  and in bf16 autocast with SDPA held to its flash kernel (MeanFlow's forward-mode pass takes the math kernel)
  within 5%; the gradients agree as closely."""
  from torch.nn.attention import SDPBackend, sdpa_kernel

  config = cuda_config()
  for name, value in dit_settings().items():
    config.model[name.split('.')[1]] = value
  if objective == 'meanflow':
    config.training.objective, config.model.time_inputs, config.meanflow.interval_fraction = 'meanflow', 2, 0.5
  torch.manual_seed(0)
  net = models.create_model(config).eval()
  with torch.no_grad():
    for p in net.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  generator = torch.Generator().manual_seed(1)
  x1 = torch.rand(8, 1, 16, 16, generator=generator) * 2 - 1
  noise = torch.randn(x1.shape, generator=generator)
  times = torch.rand(8, generator=generator) * 0.999 + 0.001
  extra = {}
  if objective == 'meanflow':
    times, end_times = losses.build_flow(config, net).sample_time_pairs(8, generator=generator)
    extra = {'end_times': end_times}
  backends = [SDPBackend.FLASH_ATTENTION] if precision == 'bf16' else [SDPBackend.EFFICIENT_ATTENTION]
  if objective == 'meanflow':
    backends.append(SDPBackend.MATH)  # The forward-mode pass; the plain forward still takes the fused kernel.
  results = {}
  for device in ('cpu', 'cuda'):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = copy.deepcopy(net).to(device)
    flow = losses.build_flow(config, model)
    on_device = {key: value.to(device) for key, value in extra.items()}
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == 'bf16' and device == 'cuda'), \
         (sdpa_kernel(backends) if device == 'cuda' else contextlib.nullcontext()):
      loss = flow(x1.to(device), noise=noise.to(device), times=times.to(device), **on_device)
    loss.backward()
    results[device] = (loss.detach().cpu(), [p.grad.cpu() for p in model.parameters()])
  tolerance = 1e-4 if precision == 'fp32' else 5e-2
  torch.testing.assert_close(results['cuda'][0], results['cpu'][0], rtol=tolerance, atol=0)
  for cuda_grad, cpu_grad in zip(results['cuda'][1], results['cpu'][1]):
    assert (cuda_grad - cpu_grad).abs().max() <= tolerance * max(cpu_grad.abs().max(), 1e-6) + 1e-6


def test_the_graph_captured_dit_step_equals_the_eager_step(tmp_path, monkeypatch):
  """The digits DiT: 3 eager updates and 3 replays of the captured update against 6 eager updates (fp32, TF32 off),
  with the same losses; then a bf16 run of the default step trains to finite weights."""
  made = record_graphed_steps(monkeypatch)
  updates = 6
  graphed = train_n_updates(tmp_path / 'graphed', updates, **dit_settings(), **{'training.cuda_graph': True})
  assert len(made) == 1 and made[0].replays == updates - 3
  eager = train_n_updates(tmp_path / 'eager', updates, **dit_settings(), **{'training.cuda_graph': False})
  assert_states_close(flat_state(eager), flat_state(graphed), rtol=1e-5)
  np.testing.assert_allclose([loss for _, loss in logged_losses(tmp_path / 'graphed')],
                             [loss for _, loss in logged_losses(tmp_path / 'eager')], rtol=1e-5)
  bf16 = train_n_updates(tmp_path / 'bf16', updates, **dit_settings(), **{'training.precision': 'bf16'})
  assert all(torch.isfinite(p).all() for p in bf16['model'].parameters())
