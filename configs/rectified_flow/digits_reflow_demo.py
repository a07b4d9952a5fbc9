"""The digits demo pipeline after the 1-rectified flow: pairs, 2-rectified flow, pairs again, one-step distillation.

Each stage is one command (see docs/digits.md); the stages read each other's outputs from these default paths. The
class-conditional pipeline (``conditional=True``) starts from digits_conditional_demo.py: its pairs come from the
teacher guided with w = 2 where t >= 0.5, each stored with its digit (500 of each), and the students learn the guided
flow per digit without label dropout, so that they are sampled without guidance (w = 1: one network evaluation per
step).
"""
from configs.rectified_flow.digits_conditional_demo import get_config as get_conditional_demo_config
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as get_demo_config

ONE_RF_CHECKPOINT = 'logs/digits_demo/checkpoints/checkpoint_3.pth'
TWO_RF_CHECKPOINT = 'logs/digits_demo_2rf/checkpoints/checkpoint_3.pth'
CONDITIONAL_ONE_RF_CHECKPOINT = 'logs/digits_conditional/checkpoints/checkpoint_3.pth'
CONDITIONAL_TWO_RF_CHECKPOINT = 'logs/digits_conditional_2rf/checkpoints/checkpoint_3.pth'


def get_stage_config(stage, conditional=False):
  config = get_conditional_demo_config() if conditional else get_demo_config()
  config.model.ema_rate = 0.999
  r = config.reflow
  r.total_number_of_samples = 5000
  r.pairs_per_shard = 500
  config.sampling.ode_tol = 1e-3
  one_rf, two_rf = ((CONDITIONAL_ONE_RF_CHECKPOINT, CONDITIONAL_TWO_RF_CHECKPOINT) if conditional else
                    (ONE_RF_CHECKPOINT, TWO_RF_CHECKPOINT))
  pairs = 'logs/digits_conditional_pairs' if conditional else 'logs/digits_pairs'
  if conditional and stage != 'pairs_1rf':  # Only the 1-RF teacher is guided; its students learn the guided flow.
    config.sampling.guidance_scale, config.sampling.guidance_t_min = 1.0, 0.0
    config.training.label_dropout = 0.0
  if stage == 'pairs_1rf':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'generate_data_from_z0', one_rf, f'{pairs}/1rf'
  elif stage == 'pairs_2rf':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'generate_data_from_z0', two_rf, f'{pairs}/2rf'
  elif stage == '2rf':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'train_reflow', one_rf, f'{pairs}/1rf'
    r.reflow_t_schedule = 'uniform'
  elif stage == 'distill':
    r.reflow_type, r.last_flow_ckpt, r.data_root = 'train_reflow', two_rf, f'{pairs}/2rf'
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
