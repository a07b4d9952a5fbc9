"""The GPU-first step, held on the CPU: no host read inside an update, bounded operators per update, device-resident
data in the loader's order, EMA and Adam skips decided on the device, precision 'auto'."""
import copy

import pytest
import torch

import checkpoints
import datasets
import losses
import run_lib
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as demo_config
from datasets import Batch, ResidentBatches, dataset_tensor, endless_batches
from datasets.digits import TensorImages
from models import ExponentialMovingAverage
from speed import cuda_graphs
from speed.dispatch_census import DispatchCensus
from speed.precision import native_bf16, resolve_precision, training_autocast
from tests.helpers import tiny_digits_config

# Operators dispatched by one fp32 update of the full digits demo model (forward, backward, clipping, fused Adam,
# EMA) measured at 1,815 with torch 2.14.1; the bound leaves 5% for other torch versions. The same update without
# fused Adam dispatches 3,719, 213 of them host reads (its per-parameter step counts, the non-finite check).
DEMO_OPERATORS_PER_UPDATE = 1900


def fixed_batch(config):
  """The (B, 1, H, W) batch in [-1, 1] that every update of ``step_of`` trains on."""
  size = config.data.image_size
  return torch.rand(config.training.batch_size, 1, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def step_of(config, nan_data=False):
  """(state, update): ``update()`` makes one update of ``config``'s network on a fixed batch, ``update(nan=True)``
  one on a batch of NaN."""
  device = torch.device('cpu')
  torch.manual_seed(0)
  state = losses.build_training_state(config, device)
  flow = losses.build_rectified_flow(config, state['model'])
  step = losses.get_step_fn(config, losses.get_loss_fn(config, flow), list(state['model'].parameters()),
                            state['optimizer'], state['ema'], train=True, device=device,
                            generator=torch.Generator().manual_seed(0))
  x1 = fixed_batch(config)
  micro = config.training.batch_size // config.training.grad_accum_steps
  batches = [Batch(None, x1[i * micro:(i + 1) * micro], slice(i * micro, (i + 1) * micro))
             for i in range(config.training.grad_accum_steps)]
  nan_batches = [Batch(None, torch.full_like(x1, float('nan')), slice(None))]

  def update(nan=False):
    return step(state, nan_batches if nan else batches)

  update.train_step = step  # The step function itself, for wrappers of it.
  return state, update


def census_of_one_update(config):
  state, update = step_of(config)
  update()  # Warm-up: Adam's state is created in the first update.
  with DispatchCensus() as census:
    update()
  return census


@pytest.mark.parametrize('precision, accumulation', [('fp32', 1), ('bf16', 1), ('fp32', 2)])
def test_an_update_makes_no_host_read_with_fused_adam(precision, accumulation):
  config = tiny_digits_config()
  config.training.precision, config.training.grad_accum_steps = precision, accumulation
  census = census_of_one_update(config)
  assert census.total > 100 and census.total_host_reads == 0, dict(census.host_reads)


def test_the_census_sees_the_host_reads_of_unfused_adam():
  config = tiny_digits_config()
  config.optim.fused = False
  census = census_of_one_update(config)
  assert census.host_reads['aten::_local_scalar_dense'] > 0


def test_operators_per_update_of_the_demo_model_stay_under_their_bound():
  config = demo_config()
  config.device, config.training.precision = 'cpu', 'fp32'
  census = census_of_one_update(config)
  assert census.total_host_reads == 0
  assert census.total <= DEMO_OPERATORS_PER_UPDATE, census.operators.most_common(10)


def test_the_training_loop_reads_the_host_only_when_it_logs(tmp_path):
  """Host reads of a 16-update run minus those of an 8-update run (log every 8, a checkpoint at the end of each):
  the 8 extra updates cost the loop's log only (the loss and the skipped-update counter), nothing per update."""

  def host_reads(n_iters):
    config = tiny_digits_config(n_iters=n_iters, log_freq=8, eval_freq=10 ** 6, snapshot_freq=n_iters,
                                snapshot_freq_for_preemption=n_iters, snapshot_sampling=False)
    with DispatchCensus() as census:
      run_lib.train(config, str(tmp_path / str(n_iters)))
    return census.total_host_reads

  assert host_reads(16) - host_reads(8) <= 2


def test_a_skipped_update_leaves_weights_ema_and_adam_untouched_without_a_host_read():
  state, update = step_of(tiny_digits_config())
  update()
  params = [p.detach().clone() for p in state['model'].parameters()]
  shadows = [s.clone() for s in state['ema'].shadow_params]
  adam = {k: v.clone() for k, v in state['optimizer'].state_dict()['state'][0].items()}
  with DispatchCensus() as census:
    loss = update(nan=True)
  assert census.total_host_reads == 0
  assert torch.isnan(loss) and int(state['nonfinite_pending']) == 1 and state['step'] == 2
  assert all(torch.equal(a, p) for a, p in zip(params, state['model'].parameters()))
  assert all(torch.equal(a, s) for a, s in zip(shadows, state['ema'].shadow_params))
  after = state['optimizer'].state_dict()['state'][0]
  assert all(torch.equal(adam[k], after[k]) for k in adam)
  assert state['ema'].num_updates == 1
  update()  # A finite update after it is applied again.
  assert state['ema'].num_updates == 2 and not torch.equal(params[0], next(state['model'].parameters()))


def test_updates_are_adam_at_the_warm_up_lr_on_the_gradient_clipped_to_grad_clip():
  """Three updates of the step function against the same updates computed here: the gradient of the per-sample mean
  squared error against X1 - X0 at X_t = t X1 + (1 - t) X0 and network time 999 t, with the noise and times drawn
  as the step draws them, scaled to global norm grad_clip (its norm is over 10 times that here), then Adam at the
  warm-up lr of each update: 0, lr / 2, lr."""
  config = tiny_digits_config()
  config.model.dropout = 0.0  # No dropout draws to replay here.
  config.optim.grad_clip = 0.1
  assert config.optim.warmup == 2 and config.optim.weight_decay == 0.0
  state, update = step_of(config)
  net = copy.deepcopy(state['model']).train()
  beta1, beta2, eps, clip = config.optim.beta1, 0.999, config.optim.eps, config.optim.grad_clip
  x1, generator, time_eps = fixed_batch(config), torch.Generator().manual_seed(0), config.training.time_eps
  # Float64 weights and Adam moments of two runs by hand: with the clip (the expectation) and without it (to show
  # that the clip changes the result by far more than the tolerance).
  weights = {clipped: [p.detach().double() for p in net.parameters()] for clipped in (True, False)}
  moments = {clipped: [(torch.zeros_like(p), torch.zeros_like(p)) for p in weights[clipped]] for clipped in weights}
  for k, lr in enumerate([0.0, config.optim.lr / 2, config.optim.lr], start=1):
    update()
    noise = torch.randn(x1.shape, generator=generator)  # (B, 1, H, W)
    t = torch.rand(x1.shape[0], generator=generator) * (1.0 - time_eps) + time_eps  # (B,)
    x_t = t[:, None, None, None] * x1 + (1.0 - t[:, None, None, None]) * noise
    for clipped in (True, False):
      with torch.no_grad():
        for param, weight in zip(net.parameters(), weights[clipped]):
          param.copy_(weight)
      loss = (net(x_t, t * 999.0) - (x1 - noise)).square().flatten(1).mean(dim=1).mean()
      grads = [g.double() for g in torch.autograd.grad(loss, list(net.parameters()))]
      norm = torch.sqrt(sum(g.square().sum() for g in grads))
      assert norm > 10 * clip
      scale = min(1.0, clip / (float(norm) + 1e-6)) if clipped else 1.0
      for index, g in enumerate(grads):
        m, v = moments[clipped][index]
        m, v = beta1 * m + (1 - beta1) * scale * g, beta2 * v + (1 - beta2) * (scale * g).square()
        moments[clipped][index] = m, v
        weights[clipped][index] = weights[clipped][index] - lr * (m / (1 - beta1 ** k)) / (
            torch.sqrt(v / (1 - beta2 ** k)) + eps)
  for actual, expected in zip(state['model'].parameters(), weights[True]):  # To float32 rounding (1.2e-7 at 1).
    torch.testing.assert_close(actual.detach().double(), expected, rtol=torch.finfo(torch.float32).eps, atol=1e-7)
  assert max(float((a - b).abs().max()) for a, b in zip(weights[True], weights[False])) > 1e-5


@pytest.mark.parametrize('fused', [True, False])
def test_weight_decay_is_an_l2_gradient_with_adam_and_decoupled_with_adamw(fused):
  """One step from zero moments on a zero loss gradient: Adam's decay is the gradient wd * p, whose normalised step
  moves every weight by lr towards 0; AdamW's shrinks each weight by the factor 1 - lr * wd and adds no step."""
  config = tiny_digits_config()
  config.optim.lr, config.optim.weight_decay, config.optim.fused = 0.01, 0.1, fused
  start = torch.tensor([1.0, -2.0, 0.5])
  moved = {}
  for name in ('Adam', 'AdamW'):
    config.optim.optimizer = name
    param = torch.nn.Parameter(start.clone())
    optimizer = losses.get_optimizer(config, [param])
    param.grad = torch.zeros_like(param)
    optimizer.step()
    moved[name] = param.detach()
  torch.testing.assert_close(moved['Adam'], start - 0.01 * start.sign(), rtol=0, atol=1e-6)
  torch.testing.assert_close(moved['AdamW'], start * (1 - 0.01 * 0.1), rtol=0, atol=1e-7)
  config.optim.optimizer = 'SGD'
  with pytest.raises(ValueError, match=r"Unknown optim.optimizer 'SGD'; valid optimisers: \['Adam', 'AdamW'\]"):
    losses.get_optimizer(config, [param])


def test_ema_update_flag_applies_or_skips_exactly():
  params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
  ema, reference = ExponentialMovingAverage(params, 0.9), ExponentialMovingAverage(params, 0.9)
  with torch.no_grad():
    for p in params:
      p.add_(1.0)
  ema.update(params, apply=torch.tensor(False))
  assert ema.num_updates == 0 and all(torch.equal(s, r) for s, r in zip(ema.shadow_params, reference.shadow_params))
  ema.update(params, apply=torch.tensor(True))
  reference.update(params)
  assert ema.num_updates == reference.num_updates == 1
  assert all(torch.equal(s, r) for s, r in zip(ema.shadow_params, reference.shadow_params))
  # Closed form after one update: d = min(0.9, 2 / 11), shadow = p0 + (1 - d) (p1 - p0) with p1 - p0 = 1.
  decay = min(0.9, 2 / 11)
  expected = [p.detach() - 1.0 + (1.0 - decay) for p in params]
  assert all(torch.allclose(s, e, atol=1e-6) for s, e in zip(ema.shadow_params, expected))


def digit_like(count, eight_bit):
  images = torch.rand(count, 1, 4, 4, generator=torch.Generator().manual_seed(count))
  return (images * 255).round() / 255 if eight_bit else images


@pytest.mark.parametrize('eight_bit', [True, False])
def test_dataset_tensor_keeps_8_bit_images_as_uint8_and_returns_the_same_values(eight_bit):
  images = digit_like(37, eight_bit)
  stored, _ = dataset_tensor(TensorImages(images), batch_size=10)
  assert stored.dtype == (torch.uint8 if eight_bit else torch.float32)
  restored = stored.float() / 255.0 if eight_bit else stored
  assert torch.equal(restored, images)


@pytest.mark.parametrize('world, rank, micro_batch, start_batch', [(1, 0, 6, 0), (2, 1, 3, 5), (2, 0, 1, 11)])
def test_resident_batches_are_the_loaders_batches(world, rank, micro_batch, start_batch):
  """Same images in the same order, across epoch boundaries (37 images, global batch 6), for any rank, micro-batch
  and resume point."""
  images = digit_like(37, eight_bit=True)
  dataset = TensorImages(images)
  order = dict(seed=3, start_batch=start_batch, micro_batch=micro_batch, rank=rank, world=world)
  loader = endless_batches(dataset, 6, **order)
  resident = iter(ResidentBatches(dataset_tensor(dataset)[0], 6, **order))
  for _ in range(40):
    from_loader, from_device = next(loader), next(resident)
    assert from_loader.labels is None and from_device.labels is None
    assert torch.equal(from_loader.x1, from_device.x1)


def divide_by_scalars_as_cuda_does(monkeypatch):
  """Tensor division by a Python number computed as CUDA's kernel computes it: a multiplication by the float32
  reciprocal (for 1 / 255, one ulp off true division for 126 of the 256 levels k / 255)."""
  def by_reciprocal(divide, multiply):
    def divided(tensor, other, *args, **kwargs):
      if isinstance(other, (int, float)) and not isinstance(other, bool) and not args and not kwargs:
        return multiply(tensor, divide(torch.ones((), dtype=torch.float32), float(other)))
      return divide(tensor, other, *args, **kwargs)
    return divided

  in_place = ['__itruediv__', 'div_', 'divide_', 'true_divide_']
  for owner, names, multiply in [(torch.Tensor, ['__truediv__', 'div', 'divide', 'true_divide'], torch.mul),
                                 (torch, ['div', 'divide', 'true_divide'], torch.mul),
                                 (torch.Tensor, in_place, torch.Tensor.mul_)]:
    for name in names:
      monkeypatch.setattr(owner, name, by_reciprocal(getattr(owner, name), multiply))


def test_resident_8_bit_batches_are_the_loaders_values_whatever_the_devices_division(monkeypatch):
  """The loader's 8-bit values are true quotients k / 255 (ToTensor divides on the CPU); on CUDA ``tensor / 255`` is a
  multiplication by the float32 reciprocal. With that arithmetic simulated on the CPU, resident batches of all 256
  levels (32 images of 8 pixels, each level once; global batch 8, two epochs) still equal the loader's bit for bit."""
  values = torch.arange(256, dtype=torch.float32).reshape(32, 1, 2, 4) / 255
  dataset = TensorImages(values)
  stored, _ = dataset_tensor(dataset)
  assert stored.dtype == torch.uint8 and torch.equal(stored.flatten(), torch.arange(256, dtype=torch.uint8))
  divide_by_scalars_as_cuda_does(monkeypatch)
  assert int((stored.float() / 255.0 != values).sum()) == 126  # The simulation is CUDA's arithmetic.
  loader, resident = endless_batches(dataset, 8, seed=3), iter(ResidentBatches(stored, 8, seed=3))
  seen = []
  for _ in range(8):
    from_loader, from_device = next(loader).x1, next(resident).x1
    seen.append(from_device)
    assert torch.equal(from_device, from_loader), f'{int((from_device != from_loader).sum())} values differ'
  assert torch.equal(torch.cat(seen).flatten().unique(), values.flatten())


def test_training_on_resident_data_equals_training_on_the_loader(tmp_path):
  def final_weights(resident):
    config = tiny_digits_config(n_iters=3, snapshot_freq=100, snapshot_freq_for_preemption=3)
    config.data.device_resident = resident
    state = run_lib.train(config, str(tmp_path / str(resident)))
    return [p.detach() for p in state['model'].parameters()]

  assert all(torch.equal(a, b) for a, b in zip(final_weights(True), final_weights(False)))


def test_training_sets_past_device_resident_max_gb_fall_back_to_the_loader_and_train_the_same(tmp_path, monkeypatch,
                                                                                             caplog):
  """The 1,617 training digits (16x16, upscaled: float32 values, 4 bytes each) with data.device_resident_max_gb just
  above their size are held on the device; just below it they are loaded, found too large as float32 and handed
  to the loader; below their size at one byte per value they go to the loader before loading. Each fallback is
  logged, and all three runs train the same weights."""
  resident_runs = []

  def recording_resident_batches(*args, **kwargs):
    resident_runs.append(ResidentBatches(*args, **kwargs))
    return resident_runs[-1]

  monkeypatch.setattr(datasets, 'ResidentBatches', recording_resident_batches)
  values = (1797 - 180) * 16 * 16  # Every tenth digit is held out.

  def run(max_gb):
    config = tiny_digits_config(n_iters=2, snapshot_freq=100, snapshot_freq_for_preemption=2, snapshot_sampling=False)
    config.data.device_resident_max_gb = max_gb
    caplog.clear()
    with caplog.at_level('INFO'):
      state = run_lib.train(config, str(tmp_path / str(max_gb)))
    return [p.detach() for p in state['model'].parameters()], caplog.text

  resident, log = run(4 * values * 1.01e-9)
  assert len(resident_runs) == 1 and 'using the data loader' not in log
  loaded_then_refused, log = run(4 * values * 0.99e-9)
  assert len(resident_runs) == 1
  assert f'as torch.float32) exceed data.device_resident_max_gb={4 * values * 0.99e-9:g}: using the data loader' in log
  refused, log = run(values * 0.99e-9)
  assert len(resident_runs) == 1
  assert f'as uint8) exceed data.device_resident_max_gb={values * 0.99e-9:g}: using the data loader' in log
  assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(resident, loaded_then_refused, refused))


@pytest.mark.parametrize('avx512_bf16, amx, expected', [(False, False, 'fp32'), (True, False, 'bf16'),
                                                       (False, True, 'bf16'), (True, True, 'bf16')])
def test_precision_auto_is_bf16_exactly_on_cpus_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
  """'auto' on CPUs with and without the instructions (faked): bf16 autocast where either is present, fp32 without;
  an explicit precision is kept whatever the CPU."""
  monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
  monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
  config = tiny_digits_config()
  config.training.precision = 'auto'
  cpu = torch.device('cpu')
  assert resolve_precision(config, cpu) == expected
  context = training_autocast(config, cpu)
  assert (isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16) == (expected == 'bf16')
  for explicit in ('fp32', 'bf16', 'fp16'):
    config.training.precision = explicit
    assert resolve_precision(config, cpu) == explicit


@pytest.mark.parametrize('capability, native', [((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_precision_auto_is_fp32_on_every_cuda_gpu(monkeypatch, capability, native):
  """'auto' stays fp32 on CUDA, also on GPUs with native bf16 (compute capability 8.0 on, faked here: no GPU is
  touched), and on the CPU of such a machine when the CPU lacks native bf16."""
  monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
  monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)
  monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: False)
  config = tiny_digits_config()
  config.training.precision = 'auto'
  cuda = torch.device('cuda', 0)
  assert native_bf16(cuda) is native
  assert resolve_precision(config, cuda) == 'fp32'
  assert resolve_precision(config, torch.device('cpu')) == 'fp32'
  config.training.precision = 'bf16'
  assert resolve_precision(config, cuda) == 'bf16'


def test_sample_grid_steps_write_an_early_grid(tmp_path):
  config = tiny_digits_config(n_iters=3, snapshot_freq=100, snapshot_freq_for_preemption=3, sample_grid_steps=(1,))
  run_lib.train(config, str(tmp_path))
  assert (tmp_path / 'samples' / 'iter_1' / 'sample.png').is_file()
  assert not (tmp_path / 'samples' / 'iter_2').exists()
  assert (tmp_path / 'samples' / 'iter_3' / 'sample.png').is_file()  # The last update is a snapshot.


def test_graph_capture_obstacles_name_each_unsupported_setting():
  config = tiny_digits_config()
  params = [torch.nn.Parameter(torch.zeros(3))]
  fused = torch.optim.Adam(params, fused=True)
  cuda = torch.device('cuda')
  assert cuda_graphs.graph_capture_obstacle(config, cuda, fused) is None
  assert 'CUDA' in cuda_graphs.graph_capture_obstacle(config, torch.device('cpu'), fused)
  assert 'optim.fused' in cuda_graphs.graph_capture_obstacle(config, cuda, torch.optim.Adam(params))
  for key, value, named in (('grad_accum_steps', 2, 'grad_accum_steps'), ('compile', True, 'compile'),
                            ('precision', 'fp16', 'fp16')):
    changed = tiny_digits_config()
    changed.training[key] = value
    assert named in cuda_graphs.graph_capture_obstacle(changed, cuda, fused)


def test_an_update_reading_its_lr_from_a_tensor_equals_one_with_a_float_lr():
  """The captured update reads the lr from a tensor that ``set_learning_rate`` fills in place (warm-up lr changes
  every update): three updates so are those of the float lr, and the checkpoint stores the float, as eager runs do."""
  config = tiny_digits_config()
  config.optim.warmup = 10
  reference, update_reference = step_of(config)
  state, update = step_of(config)
  for group in state['optimizer'].param_groups:  # float64 here for an exact comparison; the capture's is float32.
    group['lr'] = torch.tensor(0.0, dtype=torch.float64)
  for run in (update_reference, update):
    torch.manual_seed(5)  # Dropout draws from the global generator.
    for _ in range(3):
      run()
  assert float(state['optimizer'].param_groups[0]['lr']) == reference['optimizer'].param_groups[0]['lr'] > 0
  assert all(torch.equal(a, b) for a, b in zip(reference['model'].parameters(), state['model'].parameters()))
  assert all(torch.equal(a, b) for a, b in zip(reference['ema'].shadow_params, state['ema'].shadow_params))


def test_a_checkpoint_of_a_captured_optimizer_stores_its_lr_and_capture_flag_as_an_eager_run(tmp_path):
  """After two warm-up updates (lr 0, then lr / 2 > 0) the optimiser of a graph-captured run, whose lr is a device
  tensor from GraphedTrainStep's construction on and whose groups are capturable from the capture on, is saved as
  that of the eager run: the same lr, as a Python float, and capturable False."""
  config = tiny_digits_config()
  eager, update_eager = step_of(config)
  captured, update = step_of(config)
  cuda_graphs.GraphedTrainStep(update.train_step, captured['optimizer'])
  assert isinstance(captured['optimizer'].param_groups[0]['lr'], torch.Tensor)
  for run in (update_eager, update):  # The eager updates before a capture.
    torch.manual_seed(5)  # Dropout draws from the global generator.
    for _ in range(2):
      run()
  for group in captured['optimizer'].param_groups:  # What GraphedTrainStep sets at its capture.
    group['capturable'] = True
  eager_groups = eager['optimizer'].state_dict()['param_groups']
  assert eager_groups[0]['lr'] == 0.0005 and config.optim.lr == 1e-3 and config.optim.warmup == 2
  checkpoints.save_checkpoint(str(tmp_path / 'c.pth'), captured, config)
  saved = torch.load(tmp_path / 'c.pth', weights_only=True)['optimizer']['param_groups']
  assert isinstance(saved[0]['lr'], float) and saved[0]['lr'] == eager_groups[0]['lr']
  assert saved == eager_groups


def test_cuda_graph_on_the_cpu_trains_eagerly_and_says_why(tmp_path, caplog):
  def final_weights(cuda_graph):
    config = tiny_digits_config(n_iters=2, snapshot_freq=100, snapshot_freq_for_preemption=2, cuda_graph=cuda_graph)
    state = run_lib.train(config, str(tmp_path / str(cuda_graph)))
    return [p.detach() for p in state['model'].parameters()]

  with caplog.at_level('INFO'):
    graphed = final_weights(True)
  assert 'training.cuda_graph is on but not used: the device is cpu' in caplog.text
  assert all(torch.equal(a, b) for a, b in zip(graphed, final_weights(False)))


def test_the_ema_decay_tensor_follows_the_decay():
  params = [torch.nn.Parameter(torch.ones(2))]
  ema = ExponentialMovingAverage(params, 0.5, use_num_updates=False)
  decay = ema._decay_tensor()
  assert float(decay) == 0.5 and ema._decay_tensor() is decay
  ema.decay = 0.25
  assert ema._decay_tensor() is decay and float(decay) == 0.25  # Refilled in place: a captured update reads it.
  with torch.no_grad():
    params[0].add_(4.0)
  ema.update(params)
  assert torch.allclose(ema.shadow_params[0], torch.full((2,), 1.0 + 0.75 * 4.0))


def test_loading_an_ema_state_keeps_the_shadows_and_count_in_their_memory():
  """A captured update reads the shadows' and the count's memory: loading a state writes into it."""
  params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2, 3))]
  ema = ExponentialMovingAverage(params, 0.9)
  other = ExponentialMovingAverage([torch.nn.Parameter(torch.randn_like(p)) for p in params], 0.99)
  for _ in range(5):
    other.update([torch.nn.Parameter(torch.randn_like(p)) for p in params])
  addresses = [s.data_ptr() for s in ema.shadow_params] + [ema._count.data_ptr()]
  ema.load_state_dict(other.state_dict())
  assert [s.data_ptr() for s in ema.shadow_params] + [ema._count.data_ptr()] == addresses
  assert ema.num_updates == 5 and ema.decay == 0.99
  assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, other.shadow_params))
  assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ema.shadow_params, other.shadow_params))
