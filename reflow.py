"""Reflow: the teacher, the student's initial weights, online pairs from the teacher's Euler solve, and the
generation of (z0, z1) pair shards (Liu et al. 2022, Sec. 3.3); ``run_lib.reflow`` runs the stages."""
import functools
import logging
import os

import torch
from tqdm import tqdm

import checkpoints
import distributed
import evaluation
import losses
import sampling
from datasets import Batch, reflow_pairs
from datasets.streams import micro_batches_of, rows_of
from models import ExponentialMovingAverage, flow_shape, model_config_summary, num_classes
from rectified_flow_pytorch import solvers
from speed import cuda_graphs


def read_teacher(config, device):
  """The training state (network, EMA; no optimiser state) of the teacher checkpoint ``reflow.last_flow_ckpt``."""
  path = config.reflow.last_flow_ckpt
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'reflow.last_flow_ckpt={path!r} does not exist: pass the checkpoint of the flow to '
                            f'reflow from, e.g. --config.reflow.last_flow_ckpt=logs/1_rf/checkpoints/checkpoint_13.pth')
  teacher = losses.build_training_state(config, device)
  checkpoints.load_checkpoint(path, teacher, device=device, load_optimizer=False,
                              architecture=model_config_summary(config), allow_pickle=config.allow_pickle_checkpoints,
                              config=config)
  return teacher


def load_teacher(config, device):
  """The network of ``reflow.last_flow_ckpt`` with its EMA weights, frozen; also returns the file's sha256."""
  teacher = read_teacher(config, device)
  teacher['ema'].copy_to(teacher['model'].parameters())
  net = teacher['model'].eval().requires_grad_(False)
  return net, evaluation.file_sha256(config.reflow.last_flow_ckpt)


def initialize_student_from_teacher(config, device):
  """``initialize(state)``: the teacher's raw weights (published) or its EMA weights; fresh optimiser and EMA."""

  def initialize(state):
    teacher = read_teacher(config, device)
    if config.reflow.init_from_ema:
      teacher['ema'].copy_to(teacher['model'].parameters())
    state['model'].load_state_dict(teacher['model'].state_dict())
    state['ema'] = ExponentialMovingAverage(state['model'].parameters(), decay=config.model.ema_rate)
    logging.info('Student initialised from the %s weights of %s', 'EMA' if config.reflow.init_from_ema else 'raw',
                 config.reflow.last_flow_ckpt)

  return initialize


def online_teacher(config, teacher_net):
  """The velocity ``v(x, t, labels=None)`` that online reflow solves: the frozen teacher's, in fp32 (its own dtype),
  a class-conditional teacher guided with ``reflow.teacher_guidance_scale`` over ``reflow.teacher_guidance_t_min``
  / ``_t_max`` (``sampling.network_velocity``), and on CUDA replayed from one CUDA graph per batch shape when
  ``sampling.cuda_graph`` is on, as the samplers' network calls are (the teacher's weights never change). On the
  CPU it is the plain call."""
  flow = losses.build_rectified_flow(config, teacher_net)
  velocity = sampling.network_velocity(flow, 'fp32', config.reflow.teacher_guidance_scale,
                                       sampling.teacher_guidance_interval(config))
  return cuda_graphs.GraphedVelocity(velocity, module=flow, enabled=config.sampling.cuda_graph)


def online_pair_batches(config, teacher_velocity, device, generator, training=True):
  """``Batch(z0, z1, rows, labels)``, z1 the teacher's N-step Euler solve of fresh noise (published online reflow:
  N = 20).

  For training, the noise of each global batch is drawn whole from ``generator`` (saved with checkpoints), on the
  generator's device, and each process solves its micro-batches' rows (moved to ``device``); held-out batches
  (``training=False``) are whole batches. ``teacher_velocity(x, t, labels=None)`` is ``online_teacher``'s: a
  class-conditional teacher solves for labels drawn uniformly with the noise (its third argument, positional, as a
  CUDA graph's inputs are), guided as ``reflow.teacher_guidance_*`` ask (``sampling.guidance_scale`` guides the
  student's own samples); unconditional batches have labels None.
  """
  size = config.training.batch_size
  shape = flow_shape(config)
  steps, eps = config.reflow.online_teacher_steps, config.training.time_eps
  micro_batch, micro_steps = micro_batches_of(config) if training else (size, 1)
  classes = num_classes(config)
  # The draws are made on the generator's device: on CUDA with resident data (the data generator is on the GPU)
  # neither a host draw nor a host -> device copy per update; on the CPU the stream is the CPU generator's.
  draw_device = generator.device
  while True:
    z0_global = torch.randn((size, *shape), generator=generator, device=draw_device) * config.sampling.init_noise_scale
    labels_global = torch.randint(classes, (size,), generator=generator, device=draw_device) if classes else None
    for micro_step in range(micro_steps):
      rows = rows_of(micro_step, micro_batch) if training else slice(None)
      z0 = z0_global[rows].to(device)
      labels = labels_global[rows].to(device) if classes else None
      velocity = teacher_velocity if labels is None else functools.partial(labelled, teacher_velocity, labels)
      z1, _ = solvers.euler(velocity, z0, steps=steps, t0=eps, t1=1.0, step_size=1.0 / steps)
      yield Batch(z0, z1, rows, labels)


def labelled(velocity, labels, x, t):
  """``velocity(x, t, labels)``: a conditional velocity as the solvers call it, v(x, t)."""
  return velocity(x, t, labels)


def generate_reflow_pairs(config, workdir):
  """Pairs (z0, z1 = ODE(z0)) from the teacher's EMA weights, in atomic shards under reflow.data_root/seed_{seed}.

  Under torchrun each process makes the shards i = rank, rank + world, ... of those missing; a pair's noise comes
  from its own seed, so the pairs do not depend on the number of processes.
  """
  device = distributed.initialize(config.device)
  r = config.reflow
  if not r.data_root:
    raise ValueError('reflow.data_root is empty: pass the folder for the pairs, e.g. '
                     '--config.reflow.data_root=assets/reflow_data/1_rectified_flow')
  net, teacher_sha256 = load_teacher(config, device)
  flow = losses.build_rectified_flow(config, net)
  shape = flow_shape(config)
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
    z0, labels, solution, _ = sampling.sample_indexed(config, flow, sample_fn, first, count, device)
    writer.write_shard(index, z0, solution.x, solution.contributing_nfe, labels)
  distributed.barrier()
  if main_process:
    writer.refresh_manifest()
  logging.info('%s: %d pairs, NFE %s', writer.folder, writer.manifest.get('count', 0), writer.manifest.get('nfe'))
  return writer.manifest
