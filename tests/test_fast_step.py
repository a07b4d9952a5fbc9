"""The GPU-first step, held on the CPU: no host read inside an update, bounded operators per update, device-resident
data in the loader's order, EMA and Adam skips decided on the device, precision 'auto'."""
import pytest
import torch

import checkpoints
import cuda_graphs
import losses
import run_lib
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as demo_config
from datasets import ResidentBatches, dataset_tensor, endless_batches
from datasets.digits import TensorImages
from dispatch_census import DispatchCensus
from models import ExponentialMovingAverage
from tests.test_train import tiny_digits_config

# Operators dispatched by one fp32 update of the full digits demo model (forward, backward, clipping, fused Adam,
# EMA) measured at 1,815 with torch 2.14.1; the bound leaves 5% for other torch versions. The same update without
# fused Adam dispatches 3,719, 213 of them host reads (its per-parameter step counts, the non-finite check).
DEMO_OPERATORS_PER_UPDATE = 1900


def step_of(config, nan_data=False):
  """(state, update) for one update of ``config``'s network on a fixed batch (all NaN with ``nan_data``)."""
  device = torch.device('cpu')
  torch.manual_seed(0)
  state = run_lib.build_training_state(config, device)
  flow = losses.build_rectified_flow(config, state['model'])
  step = losses.get_step_fn(config, losses.get_loss_fn(config, flow), list(state['model'].parameters()),
                            state['optimizer'], state['ema'], train=True, device=device,
                            generator=torch.Generator().manual_seed(0))
  size = config.data.image_size
  x1 = torch.rand(config.training.batch_size, 1, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
  micro = config.training.batch_size // config.training.grad_accum_steps
  batches = [(None, x1[i * micro:(i + 1) * micro], slice(i * micro, (i + 1) * micro))
             for i in range(config.training.grad_accum_steps)]
  nan_batches = [(None, torch.full_like(x1, float('nan')), slice(None))]
  return state, lambda nan=False: step(state, nan_batches if nan else batches)


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
  stored = dataset_tensor(TensorImages(images), batch_size=10)
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
  resident = iter(ResidentBatches(dataset_tensor(dataset), 6, **order))
  for _ in range(40):
    assert torch.equal(next(loader), next(resident))


def test_training_on_resident_data_equals_training_on_the_loader(tmp_path):
  def final_weights(resident):
    config = tiny_digits_config(n_iters=3, snapshot_freq=100, snapshot_freq_for_preemption=3)
    config.data.device_resident = resident
    state = run_lib.train(config, str(tmp_path / str(resident)))
    return [p.detach() for p in state['model'].parameters()]

  assert all(torch.equal(a, b) for a, b in zip(final_weights(True), final_weights(False)))


def test_precision_auto_is_bf16_exactly_where_the_cpu_has_native_bf16():
  config = tiny_digits_config()
  config.training.precision = 'auto'
  cpu = torch.device('cpu')
  assert losses.resolve_precision(config, cpu) == ('bf16' if losses.native_bf16(cpu) else 'fp32')
  config.training.precision = 'fp32'
  assert losses.resolve_precision(config, cpu) == 'fp32'


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
  config = tiny_digits_config()
  state, update = step_of(config)
  update()
  eager_groups = state['optimizer'].state_dict()['param_groups']
  for group in state['optimizer'].param_groups:  # What GraphedTrainStep sets at its capture.
    group['lr'], group['capturable'] = torch.tensor(float(group['lr'])), True
  checkpoints.save_checkpoint(str(tmp_path / 'c.pth'), state, config)
  saved = torch.load(tmp_path / 'c.pth', weights_only=True)['optimizer']['param_groups']
  assert saved == eager_groups and isinstance(saved[0]['lr'], float)


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
