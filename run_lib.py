"""The stages (train, reflow, evaluate, stats) and run_training, the one training loop that every training stage
shares (1-RF, reflow, distillation); reflow.py makes the pairs, datasets/streams.py the batches, evaluation.py the
measures."""
import logging
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

import atomic_files
import checkpoints
import distributed
import evaluation
import interruption
import losses
import sampling
from datasets import latents
from datasets.streams import (
  data_batches,
  data_generator_for,
  held_out_data_batches,
  held_out_pair_batches,
  micro_batches_of,
  pair_batches,
)
from metrics_log import MetricsLog
from models import flow_shape, model_config_summary, num_classes
from reflow import (
  generate_reflow_pairs,
  initialize_student_from_teacher,
  load_teacher,
  online_pair_batches,
  online_teacher,
)
from speed import cuda_graphs
from speed.precision import resolve_precision


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

  ``train_batches(start_batch, device, generator)`` yields this process's micro-batches (``datasets.Batch``) of
  every global batch from ``start_batch`` on (``rows``: their slice of the global batch), and
  ``eval_batches(start_batch, device)`` held-out ``Batch`` es, all in model space; ``initialize(state)``
  sets the initial weights of a fresh run (e.g. the teacher's); ``reflow`` selects the reflow time schedule and
  loss of ``config.reflow``. Under torchrun every process trains its rows (DDP); only rank 0 writes files.
  """
  latents.check_latent_config(config)
  device = select_device(config)
  configure_backends(config, device)
  main_process = distributed.is_main_process()
  if main_process:
    os.makedirs(workdir, exist_ok=True)
  seed_everything(config.seed)
  state = losses.build_training_state(config, device)
  net = state['model']
  training = config.training
  micro_batch, micro_steps = micro_batches_of(config)
  logging.info('Model %s: %s parameters on %s; global batch %d = %d processes x %d micro-batches x %d, %s',
               config.model.name, f'{sum(p.numel() for p in net.parameters()):,}', device, training.batch_size,
               distributed.world_size(), micro_steps, micro_batch, resolve_precision(config, device))
  data_generator = data_generator_for(config, device)  # Augmentations; saved with the RNG state.
  path_generator = torch.Generator(device).manual_seed(config.seed + 2)  # Training noise and times; likewise.
  state['grad_scaler'] = torch.amp.GradScaler(device.type,
                                              enabled=resolve_precision(config, device) == 'fp16')

  with distributed.main_process_first():  # Rank 0 sets corrupt files aside; the others then read what it read.
    resumed, resumed_path = checkpoints.resume_from_preemption_checkpoint(
        workdir, state, device=device, architecture=model_config_summary(config),
        allow_pickle=config.allow_pickle_checkpoints, config=config)
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
  flow = losses.build_flow(config, net)  # Sampling and held-out losses: the plain network.
  train_flow = losses.build_flow(config, train_module)  # A MeanFlow's JVP runs through DDP's module too.
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
  to_images = latents.model_to_images(config, device)

  batches = train_batches(state['step'], device, data_generator)
  held_out = eval_batches(state['step'] // training.eval_freq, device) if main_process else None

  snapshot_size, snapshot_labels, grid_columns = snapshot_grid_layout(config, device)
  shape = (snapshot_size, *flow_shape(config))
  # One grid per step count of sampling.sample_steps (sample_{N}step.png), or one sample.png.
  sample_fns = {steps: sampling.get_sampling_fn(sampling.with_sample_steps(config, steps), shape)
                for steps in sampling.sample_step_counts(config)}
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
          eval_loss = eval_step(state, next(held_out)).item()
          metrics.log(step, eval_loss=eval_loss)
          logging.info('step: %d, eval_loss: %.5e', step, eval_loss)

        if main_process and training.snapshot_sampling and (is_snapshot or step in training.sample_grid_steps):
          net.eval()
          for steps, sample_fn in sample_fns.items():
            with state['ema'].average_parameters(params):
              samples, nfe = sample_fn(flow, noise=snapshot_noise, labels=snapshot_labels)
            images = to_images(samples)
            name = 'sample.png' if steps is None else f'sample_{steps}step.png'
            grid_path = sampling.save_sample_grid(images, os.path.join(sample_dir(workdir, step), name),
                                                  nrow=grid_columns)
            metrics.log(step, **{'sample_nfe' if steps is None else f'sample_nfe_{steps}step': nfe})
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

def reflow(config, workdir):
  """--mode reflow: ``reflow.reflow_type`` generate_data_from_z0, train_reflow or train_online_reflow."""
  r = config.reflow
  if config.training.objective != 'rectified_flow':
    raise ValueError(f"--mode reflow makes and trains rectified flows, not training.objective="
                     f"{config.training.objective!r}: set --config.training.objective=rectified_flow (MeanFlows train "
                     f"from data with --mode train)")
  latents.check_latent_config(config)
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
  if r.reflow_loss in losses.LPIPS_LOSSES:
    lpips_model = losses.build_lpips(r.lpips_weights_path).to(device)
  initialize = initialize_student_from_teacher(config, device)
  if r.reflow_type == 'train_reflow':
    return run_training(config, workdir,
                        train_batches=lambda start, device, generator: pair_batches(config, start, device),
                        eval_batches=lambda start, device: held_out_pair_batches(config, start, device),
                        initialize=initialize, lpips_model=lpips_model, reflow=True)
  teacher_velocity = online_teacher(config, teacher_net)
  held_out_generator = torch.Generator().manual_seed(config.seed + 1)
  return run_training(config, workdir,
                      train_batches=lambda start, device, generator: online_pair_batches(
                          config, teacher_velocity, device, generator),
                      eval_batches=lambda start, device: online_pair_batches(
                          config, teacher_velocity, device, held_out_generator, training=False),
                      initialize=initialize, lpips_model=lpips_model, reflow=True)


def evaluate(config, workdir, eval_folder):
  """Sweeps checkpoints eval.begin_ckpt..eval.end_ckpt: loss, bpd, samples, FID / IS / KID, straightness, NFE."""
  latents.check_latent_config(config)
  device = select_device(config)
  main_process = distributed.is_main_process()
  e = config.eval
  eval_dir = os.path.join(workdir, eval_folder)
  if main_process:
    os.makedirs(eval_dir, exist_ok=True)
    write_resolved_config(config, eval_dir)
  # Fails before any sampling, not after hours of it.
  reference, inception, inception_name = evaluation.metrics_backend(config, device)
  state = losses.build_training_state(config, device)
  flow = losses.build_flow(config, state['model'])
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
                                  allow_pickle=config.allow_pickle_checkpoints, config=config)
    except checkpoints.CheckpointReadError as error:  # A damaged file is skipped; a wrong architecture is raised.
      logging.error('Checkpoint %s skipped: %s', path, error)
      continue
    started = time.time()
    base = {'checkpoint': ckpt, 'step': state['step'], 'checkpoint_sha256': evaluation.file_sha256(path)}
    flow.eval()
    with state['ema'].average_parameters(params):
      if e.enable_loss and main_process:
        base['eval_loss'] = evaluation.held_out_loss(config, flow, device)
      if e.enable_bpd and main_process:
        base['bpd'], base['bpd_nfe_mean'] = evaluation.bits_per_dim(config, flow, device)
      # One report (and sample folder) per step count of sampling.sample_steps, or one for sampling.sample_N.
      for steps in sampling.sample_step_counts(config) if e.enable_sampling or e.enable_figures_only else (None,):
        suffix = '' if steps is None else f'_{steps}step'
        report = dict(base) if steps is None else {**base, 'sample_steps': steps}
        if e.enable_sampling or e.enable_figures_only:
          sampled = evaluate_samples(sampling.with_sample_steps(config, steps), flow, device,
                                     os.path.join(eval_dir, f'ckpt_{ckpt}{suffix}'), inception, inception_name,
                                     reference, base['checkpoint_sha256'])
          if sampled is None:  # Not rank 0.
            continue
          report.update(sampled)
        if not main_process:
          continue
        report['seconds'] = time.time() - started
        atomic_files.write_json(os.path.join(eval_dir, f'report_{ckpt}{suffix}.json'), report)
        logging.info('checkpoint %d%s: %s', ckpt, suffix,
                     {k: v for k, v in report.items() if k != 'checkpoint_sha256'})
        started = time.time()
  return evaluation.write_sweep_table(eval_dir) if main_process else None


def evaluate_samples(config, flow, device, folder, inception, inception_name, reference, sha256):
  """Samples one checkpoint's evaluation (resumable rounds in ``folder``) with ``config``'s sampler and returns its
  part of the report (rank 0; None on the others): NFE, straightness, the grid, and FID / IS / KID or the digits'
  FD (``eval.metrics_backend``), class agreement for a class-conditional model."""
  e = config.eval
  manifest = {'checkpoint_sha256': sha256, 'seed': config.seed, 'round_size': e.batch_size,
              'image_shape': [config.data.num_channels, config.data.image_size, config.data.image_size],
              'inception': inception_name, **sampling.sampler_settings(config), **latents.latent_settings(config)}
  with distributed.main_process_first():  # Rank 0 writes (or checks) the manifest first.
    rounds = evaluation.SampleRounds(folder, manifest)
  if e.enable_figures_only:
    config_one_round = config.copy_and_resolve_references()
    config_one_round.eval.num_samples = min(e.batch_size, 64)
    results = evaluation.sample_checkpoint(config_one_round, flow, rounds, None, device)
  else:
    results = evaluation.sample_checkpoint(config, flow, rounds, inception, device)
  if not distributed.is_main_process():
    return None
  if 'labels' in results:  # One row per class.
    grid, columns = sampling.per_class_grid(torch.from_numpy(results['images']), results['labels'], per_class=8)
  else:
    grid, columns = torch.from_numpy(results['images'][:64]), None
  sampling.save_sample_grid(grid.float() / 255.0, os.path.join(rounds.folder, 'sample_grid.png'), nrow=columns)
  report = {'num_samples': int(len(results['images'])), 'sampler': config.sampling.use_ode_sampler,
            'nfe_mean': float(results['nfe'].mean()), 'network_calls_mean': float(results['network_calls'].mean()),
            'straightness': float(results['straightness'].mean())}
  if 'labels' in results:
    report['guidance_scale'] = sampling.guidance_scale(config)
    if sampling.guidance_interval(config) is not None:
      report['guidance_interval'] = list(sampling.guidance_interval(config))
    report.update(evaluation.class_agreement(config, results['images'], results['labels']))
  if not e.enable_figures_only and (inception is not None or e.metrics_backend == 'digits'):
    report.update(evaluation.sample_quality(config, results, reference))
  return report


def compute_reference_stats(config, workdir):
  """Inception pool_3 activations of the configured dataset's training split, written to eval.stats_path."""
  device = select_device(config)
  inception = evaluation.InceptionFeatures(
      evaluation.resolve_inception_weights(config.eval.inception_weights_path), device)
  batches = evaluation.held_out_batches(config, 'train', config.eval.stats_num_images)
  features = [inception(batch.x1)[0] for batch in tqdm(batches, desc='reference stats')]
  pool_3 = torch.cat(features).numpy()
  evaluation.save_reference_statistics(config.eval.stats_path, pool_3)
  logging.info('Wrote %s: pool_3 of %d images of %s', config.eval.stats_path, len(pool_3), config.data.dataset)
  return config.eval.stats_path


