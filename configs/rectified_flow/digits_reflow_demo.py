"""The digits demo pipeline after the 1-rectified flow: pairs, 2-rectified flow, pairs again, one-step distillation.

Each stage is one command (see README); the stages read each other's outputs from these default paths.
"""
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as get_demo_config

ONE_RF_CHECKPOINT = 'logs/digits_demo/checkpoints/checkpoint_3.pth'
TWO_RF_CHECKPOINT = 'logs/digits_demo_2rf/checkpoints/checkpoint_3.pth'


def get_stage_config(stage):
  config = get_demo_config()
  config.model.ema_rate = 0.999
  r = config.reflow
  r.total_number_of_samples = 5000
  r.pairs_per_shard = 500
  config.sampling.ode_tol = 1e-3
  if stage == 'pairs_1rf':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'generate_data_from_z0', ONE_RF_CHECKPOINT, 'logs/digits_pairs/1rf'
  elif stage == 'pairs_2rf':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'generate_data_from_z0', TWO_RF_CHECKPOINT, 'logs/digits_pairs/2rf'
  elif stage == '2rf':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'train_reflow', ONE_RF_CHECKPOINT, 'logs/digits_pairs/1rf'
    r.reflow_t_schedule = 'uniform'
  elif stage == 'distill':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'train_reflow', TWO_RF_CHECKPOINT, 'logs/digits_pairs/2rf'
    r.reflow_t_schedule = 't0'
    config.sampling.use_ode_sampler = 'euler'  # Snapshot grids show the one-step generator.
    config.sampling.sample_N = 1
  else:
    raise ValueError(f'Unknown stage {stage!r}')
  if stage in ('2rf', 'distill'):
    training = config.training
    training.n_iters = 1500
    training.snapshot_freq = 500
    training.snapshot_freq_for_preemption = 250
    config.optim.lr = 2e-4
    config.optim.warmup = 100
  return config
