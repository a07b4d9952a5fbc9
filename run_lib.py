"""Training orchestration: one loop shared by every stage (1-RF training now; reflow and distillation reuse it)."""
import functools
import logging
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

import atomic_files
import checkpoints
import cuda_graphs
import datasets
import distributed
import evaluation
import evaluation_digits
import evaluation_tf
import interruption
from datasets import reflow_pairs
import losses
import sampling
from metrics_log import MetricsLog
from models import ExponentialMovingAverage, create_model, model_config_summary, num_classes
from rectified_flow_pytorch import flow as flow_math
from rectified_flow_pytorch import likelihood, solvers


def select_device(config):
  """This process's device from the ``device`` setting (``distributed.resolve_device``: 'auto' takes the LOCAL_RANK's
  GPU when CUDA is present, else the CPU), after joining torchrun's process group."""
  return distributed.initialize(config.device)


def seed_everything(seed):
  """Seeds Python, NumPy and torch; each torchrun process gets its own stream (dropout differs across ranks)."""
  seed = seed + distributed.rank()
  random.seed(seed)
  np.random.seed(seed % 2**32)
  torch.manual_seed(seed)


def configure_backends(config, device):
  """TF32 matmuls and convolutions on CUDA (``training.allow_tf32``); cuDNN autotuning for fixed shapes."""
  if device.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = config.training.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.training.allow_tf32
    torch.backends.cudnn.benchmark = True


def write_resolved_config(config, workdir):
  """Writes the fully resolved config (defaults plus overrides) to ``workdir/config.json``."""
  with atomic_files.atomic_open(os.path.join(workdir, 'config.json'), 'w') as handle:
    handle.write(config.to_json_best_effort(indent=2, sort_keys=True))


def sample_dir(workdir, step):
  return os.path.join(workdir, 'samples', f'iter_{step}')


def build_training_state(config, device):
  """Network, EMA, optimiser and step, as one dict (the unit that checkpoints save and restore)."""
  net = create_model(config).to(device)
  if config.training.channels_last:
    net = net.to(memory_format=torch.channels_last)
  ema = ExponentialMovingAverage(net.parameters(), decay=config.model.ema_rate)
  optimizer = losses.get_optimizer(config, net.parameters(), device)
  return {'model': net, 'ema': ema, 'optimizer': optimizer, 'step': 0}


def micro_batches_of(config):
  """(rows per micro-batch, micro-batches per update) of this process (``distributed.batch_split``)."""
  micro_batch = distributed.batch_split(config.training.batch_size, config.training.grad_accum_steps)
  return micro_batch, config.training.grad_accum_steps


def rows_of(micro_step, micro_batch):
  first = distributed.chunk_offset(micro_step, micro_batch)
  return slice(first, first + micro_batch)


def split_labels(batch):
  """(images, labels) of a batch of a labelled dataset ((images, labels) or [images, labels]); (images, None) of
  a batch of images."""
  if isinstance(batch, (tuple, list)):
    return batch[0], batch[1]
  return batch, None


def resident_training_images(config, dataset, device):
  """(images, labels or None) on ``device`` when ``data.device_resident`` and the images fit in
  ``data.device_resident_max_gb`` (as uint8 for 8-bit images: CIFAR-10 takes 150 MB), else None (the loader path)."""
  data = config.data
  if not data.device_resident:
    return None
  nbytes = len(dataset) * split_labels(dataset[0])[0].numel()  # At one byte per value; float images take 4.
  if nbytes > data.device_resident_max_gb * 1e9:
    logging.info('Training images (%.1f GB as uint8) exceed data.device_resident_max_gb=%g: using the data loader',
                 nbytes / 1e9, data.device_resident_max_gb)
    return None
  started = time.time()
  images, labels = split_labels(datasets.dataset_tensor(dataset, num_workers=data.num_workers))
  images, labels = images.to(device), None if labels is None else labels.to(device)
  if images.element_size() * images.numel() > data.device_resident_max_gb * 1e9:
    logging.info('Training images (%.1f GB as %s) exceed data.device_resident_max_gb=%g: using the data loader',
                 images.element_size() * images.numel() / 1e9, images.dtype, data.device_resident_max_gb)
    return None
  logging.info('Training images on %s: %s %s, %.2f GB, loaded in %.1fs', device, tuple(images.shape), images.dtype,
               images.element_size() * images.numel() / 1e9, time.time() - started)
  return images, labels


def training_stream(config, dataset, start_batch, device, seed, resident=False):
  """This process's micro-batches of every global batch from ``start_batch`` on, with their rows: (batch, rows).

  With ``resident`` (an image dataset) the images may be held on the device (``data.device_resident``); the
  batches are the same images in the same order either way.
  """
  micro_batch, micro_steps = micro_batches_of(config)
  on_device = resident_training_images(config, dataset, device) if resident else None
  order = dict(batch_size=config.training.batch_size, seed=seed, start_batch=start_batch, micro_batch=micro_batch,
               rank=distributed.rank(), world=distributed.world_size())
  if on_device is not None:
    images, labels = on_device
    batches = iter(datasets.ResidentBatches(images, labels=labels, **order))
  else:
    batches = datasets.endless_batches(dataset, num_workers=config.data.num_workers,
                                       pin_memory=device.type == 'cuda', **order)
  for index, batch in enumerate(batches):
    yield batch, rows_of(index % micro_steps, micro_batch)


def snapshot_grid_layout(config, device=None):
  """(images, labels, columns) of the snapshot sample grids: ``sampling.snapshot_batch_size`` unlabelled images in
  a square grid, or for a class-conditional model one row per class of snapshot_batch_size // num_classes images
  (at least one; with more classes than snapshot_batch_size, the first snapshot_batch_size classes)."""
  size, classes = config.sampling.snapshot_batch_size, num_classes(config)
  if not classes:
    return size, None, None
  per_class = max(1, size // classes)
  labels = sampling.grid_labels(config, per_class)[:size * per_class]
  return len(labels), labels if device is None else labels.to(device), per_class


def data_generator_for(config, device):
  """The generator of the training augmentations: on the device with device-resident data (no host draws)."""
  return torch.Generator(device if config.data.device_resident else 'cpu').manual_seed(config.seed)


def data_batches(config, start_batch, device, generator=None):
  """Training micro-batches (None, x1, rows) of the configured dataset, augmented, in model space; (None, x1,
  rows, labels) for a class-conditional model."""
  data = config.data
  dataset = datasets.get_dataset(config, train=True)
  scaler = datasets.get_data_scaler(config)
  micro_steps = config.training.grad_accum_steps
  replay = None
  stream = training_stream(config, dataset, start_batch, device, config.seed, resident=True)
  for index, (batch, rows) in enumerate(stream):
    if generator is not None and micro_steps > 1:  # Each micro-batch slices the same global-batch draws.
      if index % micro_steps == 0:
        replay = generator.get_state()
      else:
        generator.set_state(replay)
    batch, labels = split_labels(batch)
    batch = batch.to(device, non_blocking=True)
    batch = datasets.augment(batch, random_flip=data.random_flip, uniform_dequantization=data.uniform_dequantization,
                             generator=generator, global_batch=config.training.batch_size, rows=rows)
    if labels is None:
      yield None, scaler(batch), rows
    else:
      yield None, scaler(batch), rows, labels.to(device, non_blocking=True)


def held_out_data_batches(config, start_batch, device):
  """(None, x1) batches of the held-out split in model space, not augmented (for the evaluation loss); (None, x1,
  labels) for a class-conditional model."""
  dataset = datasets.get_dataset(config, train=False)
  batches = datasets.endless_batches(dataset, min(config.training.batch_size, len(dataset)), seed=config.seed + 1,
                                     start_batch=start_batch)
  scaler = datasets.get_data_scaler(config)
  for batch in batches:
    batch, labels = split_labels(batch)
    x1 = scaler(batch.to(device, non_blocking=True))
    yield (None, x1) if labels is None else (None, x1, labels.to(device, non_blocking=True))


def train(config, workdir):
  """Trains a 1-rectified flow from scratch (resuming from ``workdir/checkpoints-meta`` when interrupted)."""
  return run_training(
      config, workdir,
      train_batches=lambda start, device, generator: data_batches(config, start, device, generator),
      eval_batches=lambda start, device: held_out_data_batches(config, start, device))


class NonFiniteLossError(RuntimeError):
  """Too many updates had a non-finite loss or gradient; the checkpoints on disk hold only finite weights."""


def count_skipped_updates(state, limit, last_good_checkpoint, since_step):
  """Reads the device counter of skipped updates (one host read) into ``state['nonfinite_steps']``; logs them and
  raises ``NonFiniteLossError`` once ``limit`` updates of the run were skipped. Returns the number just read.

  The loop reads it every ``training.log_freq`` updates and before every checkpoint, so a skipped update makes
  no host read of its own; skipped updates change no weights, so the checkpoints in between stay good.
  """
  pending = state.get('nonfinite_pending')
  skipped = 0 if pending is None else int(pending)
  if not skipped:
    return 0
  pending.zero_()  # In place: a graph-captured update adds to this very tensor.
  state['nonfinite_steps'] = state.get('nonfinite_steps', 0) + skipped
  count, step = state['nonfinite_steps'], state['step']
  logging.warning('steps %d-%d: %d update(s) with a non-finite loss or gradient skipped (%d of at most %d in this '
                  'run)', since_step + 1, step, skipped, count, limit)
  if count >= limit:
    raise NonFiniteLossError(
        f'{count} updates had a non-finite loss or gradient (the last at or before step {step}), reaching '
        f'training.max_nonfinite_steps={limit}; stopped. The last good checkpoint is '
        f'{last_good_checkpoint or "none (no checkpoint was written yet)"}; its weights are finite. Lower optim.lr, '
        f'set optim.grad_clip, or check the data (NaN or Inf pixels, pairs), then resume from it.')
  return skipped


def run_training(config, workdir, train_batches, eval_batches, initialize=None, lpips_model=None, reflow=False):
  """The one training loop of every stage; stages differ only in these arguments.

  ``train_batches(start_batch, device, generator)`` yields this process's micro-batches (x0 or None, x1, rows) of
  every global batch from ``start_batch`` on (``rows``: their slice of the global batch), and
  ``eval_batches(start_batch, device)`` held-out (x0 or None, x1) batches, all in model space; ``initialize(state)``
  sets the initial weights of a fresh run (e.g. the teacher's); ``reflow`` selects the reflow time schedule and
  loss of ``config.reflow``. Under torchrun every process trains its rows (DDP); only rank 0 writes files.
  """
  device = select_device(config)
  configure_backends(config, device)
  main_process = distributed.is_main_process()
  if main_process:
    os.makedirs(workdir, exist_ok=True)
  seed_everything(config.seed)
  state = build_training_state(config, device)
  net = state['model']
  training, data = config.training, config.data
  micro_batch, micro_steps = micro_batches_of(config)
  logging.info('Model %s: %s parameters on %s; global batch %d = %d processes x %d micro-batches x %d, %s',
               config.model.name, f'{sum(p.numel() for p in net.parameters()):,}', device, training.batch_size,
               distributed.world_size(), micro_steps, micro_batch, losses.resolve_precision(config, device))
  data_generator = data_generator_for(config, device)  # Augmentations; saved with the RNG state.
  path_generator = torch.Generator(device).manual_seed(config.seed + 2)  # Training noise and times; likewise.
  state['grad_scaler'] = torch.amp.GradScaler(device.type,
                                              enabled=losses.resolve_precision(config, device) == 'fp16')

  with distributed.main_process_first():  # Rank 0 sets corrupt files aside; the others then read what it read.
    resumed, resumed_path = checkpoints.resume_from_preemption_checkpoint(
        workdir, state, device=device, architecture=model_config_summary(config),
        allow_pickle=config.allow_pickle_checkpoints)
  if main_process:  # Once the checkpoint to resume from (if any) was read: a refused one leaves the workdir as it was.
    write_resolved_config(config, workdir)
  if resumed is not None:
    logging.info('Resumed from %s at step %d', resumed_path, state['step'])
  elif initialize is not None:
    initialize(state)

  params = [p for p in net.parameters() if p.requires_grad]
  train_module = net
  if distributed.is_distributed():
    train_module = torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)
  if training.compile:
    train_module = torch.compile(train_module)
  flow = losses.build_rectified_flow(config, net)  # Sampling and held-out losses: the plain network.
  train_flow = losses.build_rectified_flow(config, train_module)
  train_step = losses.get_step_fn(
      config, losses.get_loss_fn(config, train_flow, reflow=reflow, lpips_model=lpips_model), params,
      state['optimizer'], state['ema'], train=True, device=device, generator=path_generator,
      ddp_module=train_module if distributed.is_distributed() and not training.compile else None,
      grad_scaler=state['grad_scaler'])
  if training.cuda_graph:
    obstacle = cuda_graphs.graph_capture_obstacle(config, device, state['optimizer'])
    if obstacle is None:
      train_step = cuda_graphs.GraphedTrainStep(train_step, state['optimizer'], generators=[path_generator])
      logging.info('training.cuda_graph: updates from step %d on replay one CUDA graph',
                   state['step'] + train_step.warmup_updates + 1)
    else:
      logging.info('training.cuda_graph is on but not used: %s; the updates run eagerly', obstacle)
  eval_step = losses.get_step_fn(config, losses.get_loss_fn(config, flow, reflow=reflow, lpips_model=lpips_model),
                                 params, state['optimizer'], state['ema'], train=False, device=device)
  inverse_scaler = datasets.get_data_inverse_scaler(config)

  batches = train_batches(state['step'], device, data_generator)
  held_out = eval_batches(state['step'] // training.eval_freq, device) if main_process else None

  snapshot_size, snapshot_labels, grid_columns = snapshot_grid_layout(config, device)
  shape = (snapshot_size, data.num_channels, data.image_size, data.image_size)
  sample_fn = sampling.get_sampling_fn(config, shape)
  # The same noise at every snapshot, so that grids show the progress of one set of samples.
  snapshot_noise = (torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))
                    * config.sampling.init_noise_scale).to(device)

  metrics = MetricsLog(workdir, enabled=main_process)
  if resumed is not None and 'rng' in resumed:  # Last, so nothing above draws from them.
    checkpoints.restore_rng_state(resumed['rng'], data_generator, path_generator)
  progress = tqdm(total=training.n_iters, initial=state['step'], desc='train', dynamic_ncols=True,
                  mininterval=1.0, disable=not main_process)
  last_log_time, last_log_step = time.time(), state['step']
  last_read_step = state['step']
  last_good_checkpoint = resumed_path

  def save_preemption():
    if not main_process:
      return checkpoints.preemption_checkpoint_path(workdir, state['step'])
    return checkpoints.save_preemption_checkpoint(workdir, state, config, data_generator, path_generator,
                                                  keep=training.keep_preemption_checkpoints)

  with interruption.StopRequests() as stop:
    try:
      while state['step'] < training.n_iters:
        micro = [next(batches) for _ in range(micro_steps)]
        loss = train_step(state, micro)
        step = state['step']
        progress.update(1)
        is_log = step % training.log_freq == 0
        is_snapshot = step % training.snapshot_freq == 0 or step == training.n_iters
        is_preemption = step % training.snapshot_freq_for_preemption == 0 or step == training.n_iters
        if is_log or is_snapshot or is_preemption:  # The same decision on every process (gradients are shared).
          if count_skipped_updates(state, training.max_nonfinite_steps, last_good_checkpoint, last_read_step):
            metrics.log(step, nonfinite_steps=state['nonfinite_steps'])
          last_read_step = step

        if is_log:
          loss_value = distributed.all_reduce_mean(loss).item()  # The global batch's loss.
          now = time.time()
          images_per_second = (step - last_log_step) * training.batch_size / max(now - last_log_time, 1e-9)
          last_log_time, last_log_step = now, step
          lr = losses.learning_rate(config, step - 1)  # That of the last update (a graph keeps it on the device).
          metrics.log(step, training_loss=loss_value, learning_rate=lr, images_per_second=images_per_second)
          progress.set_postfix(loss=f'{loss_value:.4f}', img_s=f'{images_per_second:.1f}')
          if main_process:
            logging.info('step: %d, training_loss: %.5e, images/s: %.1f', step, loss_value, images_per_second)

        # torchrun signals every process; they agree on the update to stop after (every log_freq updates, since
        # agreeing is a host read; a single process stops after the current update).
        if not distributed.is_distributed() or is_log:
          signum = distributed.all_reduce_max(stop.signum or 0)
          if signum:
            count_skipped_updates(state, training.max_nonfinite_steps, last_good_checkpoint, last_read_step)
            path = save_preemption()
            distributed.barrier()
            raise interruption.TrainingInterrupted(signum, step, path)

        if main_process and step % training.eval_freq == 0:
          eval_loss = eval_step(state, *next(held_out)).item()
          metrics.log(step, eval_loss=eval_loss)
          logging.info('step: %d, eval_loss: %.5e', step, eval_loss)

        if main_process and training.snapshot_sampling and (is_snapshot or step in training.sample_grid_steps):
          net.eval()
          with state['ema'].average_parameters(params):
            samples, nfe = sample_fn(flow, noise=snapshot_noise, labels=snapshot_labels)
          images = inverse_scaler(samples).clamp(0.0, 1.0)
          grid_path = sampling.save_sample_grid(images, os.path.join(sample_dir(workdir, step), 'sample.png'),
                                                nrow=grid_columns)
          metrics.log(step, sample_nfe=nfe)
          logging.info('step: %d, wrote %s (EMA weights, %s sampler, NFE %d)', step, grid_path,
                       config.sampling.use_ode_sampler, nfe)
        if main_process and is_snapshot:
          path = checkpoints.snapshot_checkpoint_path(workdir, step // training.snapshot_freq)
          checkpoints.save_checkpoint(path, state, config, data_generator, path_generator)
          logging.info('step: %d, saved %s', step, path)
        if is_preemption:
          last_good_checkpoint = save_preemption()
      distributed.barrier()  # Every process leaves once the last checkpoint is on disk.
    finally:
      progress.close()
      metrics.close()
  return state


# ----------------------------------------------------------------------------------------------------------------
# Reflow: pair generation, reflow training and distillation.

def load_teacher(config, device):
  """The network of ``reflow.last_flow_ckpt`` with its EMA weights, frozen; also returns the file's sha256."""
  path = config.reflow.last_flow_ckpt
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'reflow.last_flow_ckpt={path!r} does not exist: pass the checkpoint of the flow to '
                            f'reflow from, e.g. --config.reflow.last_flow_ckpt=logs/1_rf/checkpoints/checkpoint_13.pth')
  teacher = build_training_state(config, device)
  checkpoints.load_checkpoint(path, teacher, device=device, load_optimizer=False,
                              architecture=model_config_summary(config), allow_pickle=config.allow_pickle_checkpoints)
  teacher['ema'].copy_to(teacher['model'].parameters())
  net = teacher['model'].eval().requires_grad_(False)
  return net, evaluation.file_sha256(path)


def initialize_student_from_teacher(config, device):
  """``initialize(state)``: the teacher's raw weights (published) or its EMA weights; fresh optimiser and EMA."""

  def initialize(state):
    path = config.reflow.last_flow_ckpt
    teacher = build_training_state(config, device)
    checkpoints.load_checkpoint(path, teacher, device=device, load_optimizer=False,
                              architecture=model_config_summary(config), allow_pickle=config.allow_pickle_checkpoints)
    if config.reflow.init_from_ema:
      teacher['ema'].copy_to(teacher['model'].parameters())
    state['model'].load_state_dict(teacher['model'].state_dict())
    state['ema'] = ExponentialMovingAverage(state['model'].parameters(), decay=config.model.ema_rate)
    logging.info('Student initialised from the %s weights of %s', 'EMA' if config.reflow.init_from_ema else 'raw',
                 path)

  return initialize


def pair_batches(config, start_batch, device, generator=None):
  """Training micro-batches (z0, z1, rows) read lazily from the pair shards under ``reflow.data_root``; (z0, z1,
  rows, labels) for pairs of a class-conditional teacher."""
  del generator  # Pairs are not augmented.
  shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
  pairs = reflow_pairs.PairShards(config.reflow.data_root, shape, num_classes(config))
  for batch, rows in training_stream(config, pairs, start_batch, device, config.seed):
    yield tuple(part.to(device, non_blocking=True) for part in batch[:2]) + (rows,) + tuple(
        part.to(device, non_blocking=True) for part in batch[2:])


def held_out_pair_batches(config, start_batch, device):
  """(z0, z1[, labels]) batches of the pairs in another order, for the evaluation loss."""
  shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
  pairs = reflow_pairs.PairShards(config.reflow.data_root, shape, num_classes(config))
  for batch in datasets.endless_batches(pairs, config.training.batch_size, seed=config.seed + 1,
                                        start_batch=start_batch):
    yield tuple(part.to(device, non_blocking=True) for part in batch)


def online_pair_batches(config, teacher_velocity, device, generator, training=True):
  """(z0, z1[, rows]) with z1 from the teacher's N-step Euler solve of fresh noise (published online reflow: N = 20).

  For training, the noise of each global batch is drawn whole from ``generator`` (saved with checkpoints) and each
  process solves its micro-batches' rows; held-out batches (``training=False``) are whole batches. A
  class-conditional teacher (``teacher_velocity(x, t, labels=None)``) solves for labels drawn uniformly with the
  noise, guided with ``reflow.teacher_guidance_scale`` over ``reflow.teacher_guidance_t_min/_t_max``
  (``sampling.guidance_scale`` guides the student's own samples), and the labels come last: (z0, z1[, rows], labels).
  """
  size = config.training.batch_size
  shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
  steps, eps = config.reflow.online_teacher_steps, config.training.time_eps
  micro_batch, micro_steps = micro_batches_of(config) if training else (size, 1)
  classes = num_classes(config)
  while True:
    z0_global = torch.randn((size, *shape), generator=generator) * config.sampling.init_noise_scale
    labels_global = torch.randint(classes, (size,), generator=generator) if classes else None
    for micro_step in range(micro_steps):
      rows = rows_of(micro_step, micro_batch) if training else slice(None)
      z0 = z0_global[rows].to(device)
      velocity, labels = teacher_velocity, None
      if classes:
        labels = labels_global[rows].to(device)
        velocity = functools.partial(teacher_velocity, labels=labels,
                                     guidance_scale=config.reflow.get('teacher_guidance_scale', 1.0),
                                     guidance_interval=sampling.teacher_guidance_interval(config))
      z1, _ = solvers.euler(velocity, z0, steps=steps, t0=eps, t1=1.0, step_size=1.0 / steps)
      yield ((z0, z1, rows) if training else (z0, z1)) + (() if labels is None else (labels,))


def generate_reflow_pairs(config, workdir):
  """Pairs (z0, z1 = ODE(z0)) from the teacher's EMA weights, in atomic shards under reflow.data_root/seed_{seed}.

  Under torchrun each process makes the shards i = rank, rank + world, ... of those missing; a pair's noise comes
  from its own seed, so the pairs do not depend on the number of processes.
  """
  device = select_device(config)
  r = config.reflow
  if not r.data_root:
    raise ValueError('reflow.data_root is empty: pass the folder for the pairs, e.g. '
                     '--config.reflow.data_root=assets/reflow_data/1_rectified_flow')
  net, teacher_sha256 = load_teacher(config, device)
  flow = losses.build_rectified_flow(config, net)
  shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
  settings = {'teacher': os.path.abspath(r.last_flow_ckpt), 'teacher_sha256': teacher_sha256,
              'weights': 'ema', 'pair_format': r.pair_format, 'image_shape': list(shape),
              **sampling.sampler_settings(config)}
  main_process = distributed.is_main_process()
  with distributed.main_process_first():  # Rank 0 removes the half-written files of a killed run first.
    writer = reflow_pairs.PairShardWriter(r.data_root, config.seed, settings, r.total_number_of_samples,
                                          r.pairs_per_shard, clean_temporary=main_process)
    needed = writer.check_free_disk()
    missing = writer.missing_shards()
  mine = [missing[i] for i in distributed.shard_indices(len(missing))]
  logging.info('Generating %d of %d shards (%d by this process; %.2f GB, %d bytes per pair, format %s) into %s',
               len(missing), writer.num_shards, len(mine), needed / 1e9,
               reflow_pairs.bytes_per_pair(r.pair_format, shape), r.pair_format, writer.folder)
  sample_fn = sampling.get_sampling_fn(config, (r.pairs_per_shard, *shape))
  for index in tqdm(mine, desc='pair shards', dynamic_ncols=True, disable=not main_process):
    first, count = writer.shard_range(index)
    z0 = flow_math.indexed_noise(config.seed, first, count, shape, flow.noise_std).to(device)
    labels = sampling.sample_labels(config, first, count)
    generator = torch.Generator().manual_seed(config.seed * 2**32 + first)
    solution = sample_fn(flow, noise=z0, generator=generator, labels=None if labels is None else labels.to(device))
    writer.write_shard(index, z0, solution.x, solution.contributing_nfe, labels)
  distributed.barrier()
  if main_process:
    writer.refresh_manifest()
  logging.info('%s: %d pairs, NFE %s', writer.folder, writer.manifest.get('count', 0), writer.manifest.get('nfe'))
  return writer.manifest


def reflow(config, workdir):
  """--mode reflow: ``reflow.reflow_type`` generate_data_from_z0, train_reflow or train_online_reflow."""
  r = config.reflow
  if r.reflow_type == 'generate_data_from_z0':
    return generate_reflow_pairs(config, workdir)
  if r.reflow_type not in ('train_reflow', 'train_online_reflow'):
    raise ValueError(f"Unknown reflow.reflow_type {r.reflow_type!r}; valid: 'generate_data_from_z0', "
                     f"'train_reflow', 'train_online_reflow'")
  device = select_device(config)
  resuming = bool(checkpoints.preemption_checkpoints(workdir))
  teacher_net = None
  if not resuming or r.reflow_type == 'train_online_reflow':
    teacher_net, _ = load_teacher(config, device)  # Also fails early, clearly, when the teacher is missing.
  lpips_model = None
  if r.reflow_loss != 'l2':
    lpips_model = losses.build_lpips(r.lpips_weights_path).to(device)
  initialize = initialize_student_from_teacher(config, device)
  if r.reflow_type == 'train_reflow':
    return run_training(config, workdir,
                        train_batches=lambda start, device, generator: pair_batches(config, start, device),
                        eval_batches=lambda start, device: held_out_pair_batches(config, start, device),
                        initialize=initialize, lpips_model=lpips_model, reflow=True)
  teacher_velocity = losses.build_rectified_flow(config, teacher_net).velocity
  held_out_generator = torch.Generator().manual_seed(config.seed + 1)
  return run_training(config, workdir,
                      train_batches=lambda start, device, generator: online_pair_batches(
                          config, teacher_velocity, device, generator),
                      eval_batches=lambda start, device: online_pair_batches(
                          config, teacher_velocity, device, held_out_generator, training=False),
                      initialize=initialize, lpips_model=lpips_model, reflow=True)


def _held_out_batches(config, split, limit=0):
  """Batches of a split in a fixed order, as [0, 1] images (no augmentation)."""
  dataset = datasets.get_dataset(config, train=split == 'train')
  if limit:
    dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
  return torch.utils.data.DataLoader(dataset, batch_size=config.eval.batch_size, shuffle=False,
                                     num_workers=config.data.num_workers)


@torch.no_grad()
def held_out_loss(config, flow, device):
  """Mean training loss of the current weights over the held-out split (fixed noise and times)."""
  scaler = datasets.get_data_scaler(config)
  generator = torch.Generator().manual_seed(config.seed)
  total, count = 0.0, 0
  for batch in _held_out_batches(config, 'test'):
    batch, labels = split_labels(batch)
    x1 = scaler(batch).to(device)
    noise = (torch.randn(x1.shape, generator=generator) * flow.noise_std).to(device)
    times = flow_math.sample_times(x1.shape[0], 'uniform', eps=flow.time_eps, generator=generator).to(device)
    labels = None if labels is None else labels.to(device)
    total += flow.per_sample_loss(x1, noise=noise, times=times, labels=labels).sum().item()
    count += x1.shape[0]
  return total / count


def bits_per_dim(config, flow, device):
  """Mean bits/dim of the bpd split under the flow, with uniform dequantisation, and the mean NFE (class-conditional:
  log p(x | its label), without guidance)."""
  scaler = datasets.get_data_scaler(config)
  generator = torch.Generator().manual_seed(config.seed)
  # Model space spans 2^-7 (centred, [-1, 1)) or 2^-8 ([0, 1)) of the 8-bit range per dimension.
  offset = 7.0 if config.data.centered else 8.0
  values, nfes = [], []
  for batch in _held_out_batches(config, config.eval.bpd_dataset, config.eval.bpd_num_images):
    batch, labels = split_labels(batch)
    x1 = scaler(datasets.augment(batch, random_flip=False, uniform_dequantization=True, generator=generator))
    labels = None if labels is None else labels.to(device)
    log_p, nfe = likelihood.log_likelihood(
        lambda x, t, labels=labels: flow.velocity(x, t, labels=labels), x1.to(device), t_data=1.0, t_noise=config.training.time_eps, noise_std=flow.noise_std,
        divergence=config.eval.bpd_divergence, solver='rk45', rtol=config.sampling.ode_tol,
        atol=config.sampling.ode_tol, generator=generator)
    values.append(likelihood.bits_per_dim(log_p.cpu(), x1[0].numel(), offset))
    nfes.append(nfe)
  return float(torch.cat(values).mean()), float(np.mean(nfes))


def sample_checkpoint(config, flow, rounds, inception, device):
  """Makes (or reuses) every round of eval.num_samples samples; returns their arrays concatenated.

  Under torchrun each process makes the rounds r = rank, rank + world, ...; a sample's noise comes from its own
  seed, so the samples do not depend on the number of processes. Rank 0 returns the arrays, the others None.
  """
  data, e = config.data, config.eval
  shape = (data.num_channels, data.image_size, data.image_size)
  sample_fn = sampling.get_sampling_fn(config, (e.batch_size, *shape))
  inverse_scaler = datasets.get_data_inverse_scaler(config)
  num_rounds = -(-e.num_samples // e.batch_size)
  parts = {}
  for index in tqdm(distributed.shard_indices(num_rounds), desc='sampling rounds', dynamic_ncols=True,
                    disable=not distributed.is_main_process()):
    part = rounds.read(index)
    if part is None:
      first = index * e.batch_size
      count = min(e.batch_size, e.num_samples - first)
      noise = flow_math.indexed_noise(config.seed, first, count, shape, flow.noise_std).to(device)
      labels = sampling.sample_labels(config, first, count)
      meter = solvers.StraightnessMeter(noise)
      generator = torch.Generator().manual_seed(config.seed * 2**32 + first)
      solution = sample_fn(flow, noise=noise, on_step=meter.on_step, generator=generator,
                           labels=None if labels is None else labels.to(device))
      samples = solution.x
      images = evaluation.InceptionFeatures.to_uint8(inverse_scaler(samples).clamp(0.0, 1.0)).cpu()
      pool_3, logits = inception(images) if inception is not None else (np.zeros((count, 0)), np.zeros((count, 0)))
      part = {'images': images.numpy(), 'pool_3': np.asarray(pool_3), 'logits': np.asarray(logits),
              'nfe': np.full(count, solution.contributing_nfe), 'network_calls': np.full(count, solution.nfe),
              'straightness': meter.value(samples).cpu().numpy()}
      if labels is not None:
        part['labels'] = labels.numpy()
      rounds.write(index, **part)
    parts[index] = part
  distributed.barrier()
  if not distributed.is_main_process():
    return None
  for index in range(num_rounds):
    if index not in parts:
      parts[index] = rounds.read(index)
      if parts[index] is None:
        raise RuntimeError(f'Sampling round {rounds.path(index)} of another process is missing or unreadable')
  return {key: np.concatenate([parts[i][key] for i in range(num_rounds)])[:e.num_samples] for key in parts[0]}


def class_agreement(config, images, labels):
  """{'class_accuracy', 'class_accuracy_per_class'}: the fraction of samples that a classifier of the dataset
  assigns to the class they were sampled for (the digits: ``evaluation_digits``' CNN); {} for datasets without one.

  ``images`` (N, C, H, W) uint8 samples as saved, ``labels`` (N,).
  """
  if config.data.dataset != 'DIGITS' or config.data.image_size != evaluation_digits.IMAGE_SIZE:
    return {}
  classifier = evaluation_digits.digit_classifier()
  model_space = torch.from_numpy(images).float() / 127.5 - 1.0  # The classifier's input: digits in [-1, 1].
  labels = torch.as_tensor(labels)
  per_class = evaluation_digits.per_class_accuracy(classifier, model_space, labels)
  return {'class_accuracy': evaluation_digits.class_accuracy(classifier, model_space, labels),
          'class_accuracy_per_class': {str(c): float(v) for c, v in per_class.items()}}


def evaluate(config, workdir, eval_folder):
  """Sweeps checkpoints eval.begin_ckpt..eval.end_ckpt: loss, bpd, samples, FID / IS / KID, straightness, NFE."""
  device = select_device(config)
  main_process = distributed.is_main_process()
  e = config.eval
  eval_dir = os.path.join(workdir, eval_folder)
  if main_process:
    os.makedirs(eval_dir, exist_ok=True)
    write_resolved_config(config, eval_dir)
  if e.metrics_backend not in ('torch', 'tfgan'):
    raise ValueError(f"Unknown eval.metrics_backend {e.metrics_backend!r}; valid: 'torch', 'tfgan'")
  reference, inception, inception_name = None, None, None
  if e.enable_sampling and not e.enable_figures_only:  # Fail before any sampling, not after hours of it.
    reference = evaluation.load_reference_statistics(e.stats_path)
    if e.metrics_backend == 'tfgan':
      evaluation_tf.require_tfgan()
      inception = evaluation_tf.tfhub_inception_or_none()
      inception_name = evaluation_tf.TFHUB_INCEPTION if inception is not None else None
    if inception is None:
      inception = evaluation.InceptionFeatures(evaluation.resolve_inception_weights(e.inception_weights_path), device)
      inception_name = evaluation.INCEPTION_WEIGHTS_FILE
  state = build_training_state(config, device)
  flow = losses.build_rectified_flow(config, state['model'])
  params = [p for p in state['model'].parameters() if p.requires_grad]

  for ckpt in range(e.begin_ckpt, e.end_ckpt + 1):
    path = checkpoints.snapshot_checkpoint_path(workdir, ckpt)
    # Rank 0 decides, so that every process evaluates the same checkpoints.
    if not distributed.broadcast_object(main_process and evaluation.wait_for_file(path, e.checkpoint_wait_seconds)):
      logging.warning('Checkpoint %s does not exist after waiting %gs: skipped', path, e.checkpoint_wait_seconds)
      continue
    try:
      checkpoints.load_checkpoint(path, state, device=device, load_optimizer=False,
                                  architecture=model_config_summary(config),
                                  allow_pickle=config.allow_pickle_checkpoints)
    except checkpoints.CheckpointReadError as error:  # A damaged file is skipped; a wrong architecture is raised.
      logging.error('Checkpoint %s skipped: %s', path, error)
      continue
    started = time.time()
    report = {'checkpoint': ckpt, 'step': state['step'], 'checkpoint_sha256': evaluation.file_sha256(path)}
    flow.eval()
    with state['ema'].average_parameters(params):
      if e.enable_loss and main_process:
        report['eval_loss'] = held_out_loss(config, flow, device)
      if e.enable_bpd and main_process:
        report['bpd'], report['bpd_nfe_mean'] = bits_per_dim(config, flow, device)
      if e.enable_sampling or e.enable_figures_only:
        manifest = {'checkpoint_sha256': report['checkpoint_sha256'], 'seed': config.seed,
                    'round_size': e.batch_size, 'image_shape': [config.data.num_channels, config.data.image_size,
                                                                config.data.image_size],
                    'inception': inception_name,
                    **sampling.sampler_settings(config)}
        with distributed.main_process_first():  # Rank 0 writes (or checks) the manifest first.
          rounds = evaluation.SampleRounds(os.path.join(eval_dir, f'ckpt_{ckpt}'), manifest)
        if e.enable_figures_only:
          config_one_round = config.copy_and_resolve_references()
          config_one_round.eval.num_samples = min(e.batch_size, 64)
          results = sample_checkpoint(config_one_round, flow, rounds, None, device)
        else:
          results = sample_checkpoint(config, flow, rounds, inception, device)
        if not main_process:
          continue
        if 'labels' in results:  # One row per class.
          grid, columns = sampling.per_class_grid(torch.from_numpy(results['images']), results['labels'], per_class=8)
        else:
          grid, columns = torch.from_numpy(results['images'][:64]), None
        sampling.save_sample_grid(grid.float() / 255.0, os.path.join(rounds.folder, 'sample_grid.png'), nrow=columns)
        report.update(num_samples=int(len(results['images'])), sampler=config.sampling.use_ode_sampler,
                      nfe_mean=float(results['nfe'].mean()), network_calls_mean=float(results['network_calls'].mean()),
                      straightness=float(results['straightness'].mean()))
        if 'labels' in results:
          report['guidance_scale'] = sampling.guidance_scale(config)
          if sampling.guidance_interval(config) is not None:
            report['guidance_interval'] = list(sampling.guidance_interval(config))
          report.update(class_agreement(config, results['images'], results['labels']))
        if inception is not None and e.metrics_backend == 'tfgan':
          report.update(evaluation_tf.tfgan_metrics(results['logits'], results['pool_3'], reference['pool_3'],
                                                    (reference['mu'], reference['sigma'])))
          report['metrics_backend'] = 'tfgan'
        elif inception is not None:
          mu, sigma = evaluation.gaussian_statistics(results['pool_3'])
          report['fid'] = evaluation.frechet_distance(mu, sigma, reference['mu'], reference['sigma'])
          report['inception_score'] = evaluation.inception_score(results['logits'], splits=1)[0]
          report['inception_score_split_mean'], report['inception_score_split_std'] = evaluation.inception_score(
              results['logits'], splits=e.inception_score_splits)
          if reference['pool_3'] is not None:
            report['kid'], report['kid_std'] = evaluation.kernel_inception_distance(
                results['pool_3'], reference['pool_3'], subsets=e.kid_subsets, subset_size=e.kid_subset_size,
                seed=config.seed)
          else:
            report['kid'] = None  # The stats file has mu/sigma only, not the raw features KID needs.
    if not main_process:
      continue
    report['seconds'] = time.time() - started
    atomic_files.write_json(os.path.join(eval_dir, f'report_{ckpt}.json'), report)
    logging.info('checkpoint %d: %s', ckpt, {k: v for k, v in report.items() if k != 'checkpoint_sha256'})
  return evaluation.write_sweep_table(eval_dir) if main_process else None


def compute_reference_stats(config, workdir):
  """Inception pool_3 activations of the configured dataset's training split, written to eval.stats_path."""
  device = select_device(config)
  inception = evaluation.InceptionFeatures(
      evaluation.resolve_inception_weights(config.eval.inception_weights_path), device)
  batches = _held_out_batches(config, 'train', config.eval.stats_num_images)
  features = [inception(split_labels(batch)[0])[0] for batch in tqdm(batches, desc='reference stats')]
  pool_3 = torch.cat(features).numpy()
  evaluation.save_reference_statistics(config.eval.stats_path, pool_3)
  logging.info('Wrote %s: pool_3 of %d images of %s', config.eval.stats_path, len(pool_3), config.data.dataset)
  return config.eval.stats_path


