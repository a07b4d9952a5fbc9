"""Training orchestration: one loop shared by every stage (1-RF training now; reflow and distillation reuse it)."""
import json
import logging
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import datasets
import losses
import sampling
from metrics_log import MetricsLog
from models import ExponentialMovingAverage, create_model


def select_device():
  return torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')


def seed_everything(seed):
  random.seed(seed)
  np.random.seed(seed % 2**32)
  torch.manual_seed(seed)


def write_resolved_config(config, workdir):
  """Writes the fully resolved config (defaults plus overrides) to ``workdir/config.json``."""
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as handle:
    handle.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def sample_dir(workdir, step):
  return os.path.join(workdir, 'samples', f'iter_{step}')


def build_training_state(config, device):
  """Network, EMA, optimiser and step, as one dict (the unit that checkpoints save and restore)."""
  net = create_model(config).to(device)
  ema = ExponentialMovingAverage(net.parameters(), decay=config.model.ema_rate)
  optimizer = losses.get_optimizer(config, net.parameters())
  return {'model': net, 'ema': ema, 'optimizer': optimizer, 'step': 0}


def train(config, workdir):
  """Trains a rectified flow from scratch, resuming from ``workdir/checkpoints-meta`` when a run was interrupted."""
  device = select_device()
  os.makedirs(workdir, exist_ok=True)
  write_resolved_config(config, workdir)
  seed_everything(config.seed)
  state = build_training_state(config, device)
  net = state['model']
  logging.info('Model %s: %s parameters on %s', config.model.name,
               f'{sum(p.numel() for p in net.parameters()):,}', device)
  data_generator = torch.Generator().manual_seed(config.seed)  # Augmentations; saved with the RNG state.

  meta_path = checkpoints.preemption_checkpoint_path(workdir)
  resumed = None
  if os.path.exists(meta_path):
    resumed = checkpoints.load_checkpoint(meta_path, state, device=device)
    logging.info('Resumed from %s at step %d', meta_path, state['step'])

  flow = losses.build_rectified_flow(config, net)
  train_step = losses.get_step_fn(config, flow, state['optimizer'], state['ema'], train=True)
  eval_step = losses.get_step_fn(config, flow, state['optimizer'], state['ema'], train=False)
  params = [p for p in net.parameters() if p.requires_grad]
  scaler, inverse_scaler = datasets.get_data_scaler(config), datasets.get_data_inverse_scaler(config)

  training, data = config.training, config.data
  train_set, eval_set = datasets.get_dataset(config, train=True), datasets.get_dataset(config, train=False)
  train_batches = datasets.endless_batches(train_set, training.batch_size, seed=config.seed,
                                           start_batch=state['step'], num_workers=data.num_workers,
                                           pin_memory=device.type == 'cuda')
  eval_batch_size = min(training.batch_size, len(eval_set))
  eval_batches = datasets.endless_batches(eval_set, eval_batch_size, seed=config.seed + 1,
                                          start_batch=state['step'] // training.eval_freq)

  shape = (config.sampling.snapshot_batch_size, data.num_channels, data.image_size, data.image_size)
  sample_fn = sampling.get_sampling_fn(config, shape)
  # The same noise at every snapshot, so that grids show the progress of one set of samples.
  snapshot_noise = (torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))
                    * config.sampling.init_noise_scale).to(device)

  metrics = MetricsLog(workdir)
  if resumed is not None and 'rng' in resumed:
    checkpoints.restore_rng_state(resumed['rng'], data_generator)  # Last, so nothing above draws from it.
  progress = tqdm(total=training.n_iters, initial=state['step'], desc='train', dynamic_ncols=True,
                  mininterval=1.0)
  last_log_time, last_log_step = time.time(), state['step']
  while state['step'] < training.n_iters:
    batch = datasets.augment(next(train_batches), random_flip=data.random_flip,
                             uniform_dequantization=data.uniform_dequantization, generator=data_generator)
    loss = train_step(state, scaler(batch.to(device, non_blocking=True)))
    step = state['step']
    progress.update(1)

    if step % training.log_freq == 0:
      now = time.time()
      images_per_second = (step - last_log_step) * training.batch_size / max(now - last_log_time, 1e-9)
      last_log_time, last_log_step = now, step
      loss_value = loss.item()
      lr = state['optimizer'].param_groups[0]['lr']
      metrics.log(step, training_loss=loss_value, learning_rate=lr, images_per_second=images_per_second)
      progress.set_postfix(loss=f'{loss_value:.4f}', img_s=f'{images_per_second:.1f}')
      logging.info('step: %d, training_loss: %.5e, images/s: %.1f', step, loss_value, images_per_second)

    if step % training.eval_freq == 0:
      eval_loss = eval_step(state, scaler(next(eval_batches).to(device))).item()
      metrics.log(step, eval_loss=eval_loss)
      logging.info('step: %d, eval_loss: %.5e', step, eval_loss)

    is_snapshot = step % training.snapshot_freq == 0 or step == training.n_iters
    if is_snapshot and training.snapshot_sampling:
      flow.eval()
      with state['ema'].average_parameters(params):
        samples, nfe = sample_fn(flow, noise=snapshot_noise)
      images = inverse_scaler(samples).clamp(0.0, 1.0)
      grid_path = sampling.save_sample_grid(images, os.path.join(sample_dir(workdir, step), 'sample.png'))
      metrics.log(step, sample_nfe=nfe)
      logging.info('step: %d, wrote %s (EMA weights, %s sampler, NFE %d)', step, grid_path,
                   config.sampling.use_ode_sampler, nfe)
    if is_snapshot:
      path = checkpoints.snapshot_checkpoint_path(workdir, step // training.snapshot_freq)
      checkpoints.save_checkpoint(path, state, config, data_generator)
      logging.info('step: %d, saved %s', step, path)
    if step % training.snapshot_freq_for_preemption == 0 or step == training.n_iters:
      checkpoints.save_checkpoint(meta_path, state, config, data_generator)
  progress.close()
  metrics.close()
  with open(os.path.join(workdir, 'train_done.json'), 'w', encoding='utf-8') as handle:
    json.dump({'step': state['step']}, handle)
  return state


def evaluate(config, workdir, eval_folder):
  raise NotImplementedError('--mode eval (checkpoint sweeps with FID/IS/KID) is not implemented yet; it is '
                            'tracked by the samplers-and-evaluation issue. Use --mode train.')


def reflow(config, workdir):
  raise NotImplementedError('--mode reflow (pair generation, reflow and distillation) is not implemented yet; it '
                            'is tracked by the reflow issue. Use --mode train.')
