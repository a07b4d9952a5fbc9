"""--mode train end to end on the digits demo config: files, metrics, published format, exact resume, compile."""
import json
import math
import os
import time

import pytest
import torch
from ml_collections import config_dict

import datasets
import losses
import run_lib
from models import create_model
from tests import fault_injection
from tests.conftest import TINY_RUN_UPDATES
from tests.helpers import flat_state, tiny_digits_config


def test_main_trains_and_writes_both_checkpoint_kinds(tiny_run):
  """``main.py --mode train`` end to end, on the session's tiny run (TINY_RUN_UPDATES updates, a snapshot at the end,
  a preemption checkpoint every PREEMPTION_INTERVAL updates, the newest 2 kept): published format, samples, the
  resolved config, metrics and TensorBoard, no temporary file left."""
  workdir, steps, interval = tiny_run, TINY_RUN_UPDATES, fault_injection.PREEMPTION_INTERVAL
  snapshot = workdir / 'checkpoints' / 'checkpoint_1.pth'
  assert snapshot.is_file()
  assert sorted(os.listdir(workdir / 'checkpoints-meta')) == [f'checkpoint_{steps - interval}.pth',
                                                              f'checkpoint_{steps}.pth']
  checkpoint = torch.load(snapshot, map_location='cpu', weights_only=True)
  assert {'optimizer', 'model', 'ema', 'step', 'rng', 'config'} <= set(checkpoint)
  assert checkpoint['step'] == steps
  assert all(key.startswith('module.') for key in checkpoint['model'])
  assert set(checkpoint['ema']) == {'decay', 'num_updates', 'shadow_params'}
  assert checkpoint['ema']['num_updates'] == steps
  assert len(checkpoint['ema']['shadow_params']) == len(checkpoint['optimizer']['state'])
  assert config_dict.ConfigDict(json.loads(checkpoint['config'])).training.n_iters == steps

  assert (workdir / 'samples' / f'iter_{steps}' / 'sample.png').is_file()
  resolved = json.loads((workdir / 'config.json').read_text())
  assert resolved['training']['n_iters'] == steps and resolved['model']['nf'] == 16
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'training_loss' in r] == list(range(1, steps + 1))
  assert any('sample_nfe' in r for r in records)
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir / 'tensorboard'))
  assert not list(workdir.rglob('*.tmp*'))
  log = (workdir / 'stdout.txt').read_text()  # The log: the framework's records, from start to the last snapshot.
  assert 'Model ncsnpp:' in log and f'step: {steps}, saved' in log


def test_metrics_hold_the_warm_up_lr_images_per_second_and_the_held_out_loss_of_the_ema_weights(tmp_path,
                                                                                                   monkeypatch):
  """metrics.jsonl of 4 updates (lr 1e-3, 2 warm-up updates, log every update, held-out loss every 2): the lr of each
  update, images/s over the time between two logs, and at steps 2 and 4 the held-out loss, recomputed here from
  the EMA weights, the batch and the global RNG state it was computed with: the mean over the batch of the mean
  squared error of the network's output at X_t = t X1 + (1 - t) X0 (time input 999 t) against X1 - X0."""
  config = tiny_digits_config(n_iters=4, snapshot_freq=100, snapshot_freq_for_preemption=4, snapshot_sampling=False)
  assert config.optim.lr == 1e-3 and config.optim.warmup == 2 and config.training.eval_freq == 2
  held_out_losses = []  # (global RNG state, x1, EMA shadows) of each held-out loss, in order.
  get_step_fn = losses.get_step_fn

  def recording_get_step_fn(*args, train, **kwargs):
    step = get_step_fn(*args, train=train, **kwargs)
    if train:
      return step

    def eval_step(state, batch):
      held_out_losses.append((torch.get_rng_state(), batch.x1.clone(),
                              [s.clone() for s in state['ema'].shadow_params]))
      return step(state, batch)

    return eval_step

  monkeypatch.setattr(losses, 'get_step_fn', recording_get_step_fn)
  started = time.time()
  run_lib.train(config, str(tmp_path))
  seconds = time.time() - started
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  training = [r for r in records if 'training_loss' in r]
  assert [r['step'] for r in training] == [1, 2, 3, 4]
  assert [r['learning_rate'] for r in training] == [0.0, 0.0005, 0.001, 0.001]  # lr * min(updates before / 2, 1).
  batch = config.training.batch_size
  assert all(batch / seconds <= r['images_per_second'] < math.inf for r in training)
  for before, after in zip(training, training[1:]):  # One update of `batch` images between consecutive logs.
    assert abs(batch / after['images_per_second'] - (after['time'] - before['time'])) < 0.05, (before, after)

  evaluated = [r for r in records if 'eval_loss' in r]
  assert [r['step'] for r in evaluated] == [2, 4] and len(held_out_losses) == 2
  images = datasets.get_dataset(config, train=False).images * 2.0 - 1.0  # (180, 1, 16, 16) in [-1, 1]
  net = create_model(config).eval()
  time_eps = config.training.time_eps
  for record, (rng_state, x1, shadows) in zip(evaluated, held_out_losses):
    assert x1.shape[0] == batch
    distance_to_held_out = torch.cdist(x1.flatten(1), images.flatten(1)).min(dim=1).values  # (B,)
    assert float(distance_to_held_out.max()) < 1e-6
    with torch.no_grad():
      for param, shadow in zip(net.parameters(), shadows):
        param.copy_(shadow)
      torch.set_rng_state(rng_state)
      noise = torch.randn(x1.shape)  # (B, 1, H, W)
      t = torch.rand(x1.shape[0]) * (1.0 - time_eps) + time_eps  # (B,)
      x_t = t[:, None, None, None] * x1 + (1.0 - t[:, None, None, None]) * noise
      expected = (net(x_t, t * 999.0) - (x1 - noise)).square().flatten(1).mean(dim=1).mean()
    assert math.isfinite(record['eval_loss'])
    assert record['eval_loss'] == pytest.approx(float(expected), rel=1e-6)


def test_compile_trains_through_what_torch_compile_returns_for_the_training_network(tmp_path, monkeypatch):
  """training.compile hands the training network to torch.compile and makes every update's forward through what it
  returns, while held-out losses and sample grids use the plain network; with a counting identity in place of the
  compiler (whose code generation is too slow for a unit test) the run equals an eager one bit for bit."""

  class CountingModule(torch.nn.Module):
    def __init__(self, net):
      super().__init__()
      self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
      self.calls += 1
      return self.net(*args, **kwargs)

  compiled = []

  def counting_compile(module, **kwargs):
    compiled.append(CountingModule(module))
    return compiled[-1]

  monkeypatch.setattr(torch, 'compile', counting_compile)

  def final_weights(compile_network):
    config = tiny_digits_config(n_iters=3, snapshot_freq=100, snapshot_freq_for_preemption=3, compile=compile_network)
    state = run_lib.train(config, str(tmp_path / str(compile_network)))
    return state, [p.detach() for p in state['model'].parameters()]

  state, weights = final_weights(True)
  assert len(compiled) == 1 and compiled[0].net is state['model']
  assert compiled[0].calls == 3  # One forward per update; none for the held-out loss (step 2) or the grid (step 3).
  assert (tmp_path / 'True' / 'samples' / 'iter_3' / 'sample.png').is_file()
  _, eager_weights = final_weights(False)
  assert len(compiled) == 1
  assert all(torch.equal(a, b) for a, b in zip(weights, eager_weights))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
  uninterrupted = run_lib.train(tiny_digits_config(n_iters=4, snapshot_freq=100, snapshot_freq_for_preemption=2),
                                str(tmp_path / 'a'))
  run_lib.train(tiny_digits_config(n_iters=2, snapshot_freq=100, snapshot_freq_for_preemption=2),
                str(tmp_path / 'b'))
  first_half = torch.load(tmp_path / 'b' / 'checkpoints-meta' / 'checkpoint_2.pth', map_location='cpu',
                          weights_only=True)
  assert first_half['step'] == 2
  resumed = run_lib.train(tiny_digits_config(n_iters=4, snapshot_freq=100, snapshot_freq_for_preemption=2),
                          str(tmp_path / 'b'))
  assert resumed['step'] == uninterrupted['step'] == 4
  expected, actual = flat_state(uninterrupted), flat_state(resumed)
  assert expected.keys() == actual.keys()
  for key in expected:
    assert torch.equal(expected[key], actual[key]), key
  loss_lines = [json.loads(line) for line in (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()]
  reference_lines = [json.loads(line) for line in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
  assert ([r['training_loss'] for r in loss_lines if 'training_loss' in r]
          == [r['training_loss'] for r in reference_lines if 'training_loss' in r])


def test_resume_starts_from_the_saved_weights(tmp_path):
  workdir = str(tmp_path / 'c')
  run_lib.train(tiny_digits_config(n_iters=2, snapshot_freq=100, snapshot_freq_for_preemption=2), workdir)
  saved = torch.load(os.path.join(workdir, 'checkpoints-meta', 'checkpoint_2.pth'), map_location='cpu',
                     weights_only=True)
  # Same n_iters: the restarted run resumes at step 2, trains nothing and keeps the saved weights.
  state = run_lib.train(tiny_digits_config(n_iters=2, snapshot_freq=100, snapshot_freq_for_preemption=2), workdir)
  assert state['step'] == 2
  for key, value in state['model'].state_dict().items():
    assert torch.equal(value, saved['model']['module.' + key]), key


@pytest.mark.parametrize('precision, channels_last', [('bf16', True), ('fp16', False)])
def test_mixed_precision_trains_with_fp32_state_and_resumes_exactly(tmp_path, precision, channels_last):
  def config(n_iters):
    c = tiny_digits_config(n_iters=n_iters, snapshot_freq=100, snapshot_freq_for_preemption=2)
    c.training.precision, c.training.channels_last = precision, channels_last
    c.optim.warmup = 0
    return c

  uninterrupted = run_lib.train(config(4), str(tmp_path / 'a'))
  assert all(p.dtype == torch.float32 for p in uninterrupted['model'].parameters())
  assert all(s.dtype == torch.float32 for s in uninterrupted['ema'].shadow_params)
  records = [json.loads(line) for line in (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()]
  assert all(torch.isfinite(torch.tensor(r['training_loss'])) for r in records if 'training_loss' in r)
  saved = torch.load(tmp_path / 'a' / 'checkpoints-meta' / 'checkpoint_4.pth', map_location='cpu', weights_only=True)
  assert ('grad_scaler' in saved) == (precision == 'fp16')
  run_lib.train(config(2), str(tmp_path / 'b'))
  resumed = run_lib.train(config(4), str(tmp_path / 'b'))
  expected, actual = flat_state(uninterrupted), flat_state(resumed)
  assert all(torch.equal(expected[key], actual[key]) for key in expected)
  run_lib.seed_everything(config(4).seed)
  fresh = flat_state(losses.build_training_state(config(4), torch.device('cpu')))
  assert not torch.equal(fresh['param.0'], actual['param.0'])  # It trained.


def test_unknown_precision_is_a_clear_error(tmp_path):
  config = tiny_digits_config(n_iters=1, snapshot_freq=100, snapshot_freq_for_preemption=1)
  config.training.precision = 'fp8'
  with pytest.raises(ValueError, match=r"Unknown training.precision 'fp8'; valid: \['fp32', 'bf16', 'fp16'\]"):
    run_lib.train(config, str(tmp_path))
