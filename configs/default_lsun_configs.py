"""Defaults of the published 256x256 NCSN++ rectified flows (LSUN, CelebA-HQ, AFHQ)."""
from configs.default_cifar10_configs import get_default_configs as get_cifar10_defaults


def get_default_configs():
  config = get_cifar10_defaults()
  training = config.training
  training.batch_size = 64
  training.n_iters = 2400000
  training.snapshot_freq = 100000
  training.snapshot_freq_for_preemption = 5000

  config.eval.batch_size = 512
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 24

  data = config.data
  data.dataset = 'LSUN'
  data.image_size = 256
  data.centered = False

  model = config.model
  model.sigma_max = 378
  model.sigma_min = 0.01
  model.num_scales = 2000
  model.dropout = 0.0
  model.embedding_type = 'fourier'
  model.scale_by_sigma = True
  model.ema_rate = 0.999
  model.nf = 128
  model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.progressive = 'output_skip'
  model.progressive_input = 'input_skip'
  model.progressive_combine = 'sum'
  return config
