"""Demo: a small DDPM++ 1-rectified flow on scikit-learn's 8x8 digits upscaled to 16x16 (no download, CPU)."""
from configs.default_cifar10_configs import get_default_configs


def get_config():
  config = get_default_configs()
  training = config.training
  training.batch_size = 64
  training.n_iters = 3000
  training.snapshot_freq = 1000
  training.sample_grid_steps = (500,)  # A first look at the samples within minutes.
  training.snapshot_freq_for_preemption = 250
  training.log_freq = 25
  training.eval_freq = 250

  sampling = config.sampling
  sampling.use_ode_sampler = 'rk45'
  sampling.ode_tol = 1e-4

  data = config.data
  data.dataset = 'DIGITS'
  data.image_size = 16
  data.num_channels = 1
  data.random_flip = False  # Mirrored digits are not digits.
  data.num_workers = 0

  model = config.model
  model.nf = 32
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (8,)
  model.dropout = 0.0
  model.ema_rate = 0.999

  evaluate = config.eval
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 3
  evaluate.batch_size = 500
  evaluate.num_samples = 2000
  evaluate.stats_path = 'assets/stats/digits16_stats.npz'
  evaluate.kid_subset_size = 500

  config.optim.warmup = 200
  config.optim.lr = 1e-3
  return config
