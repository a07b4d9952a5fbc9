"""MeanFlow on CIFAR-10 from scratch (no teacher, no pairs) with the DDPM++ of the 1-rectified flow, given a second
time input: Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling" (arXiv:2505.13447, 2025). They
report an unconditional CIFAR-10 FID of 2.92 at one network evaluation with a U-Net of about 55M parameters.

Sources of the settings: the paper (Sec. 4 and 5: the MeanFlow identity, the adaptive weight, logit-normal (t, r)
pairs with a fraction r != t), and the CIFAR-10 settings of the authors' PyTorch code as a public copy of it holds
them (py-meanflow, configs/cifar10_v0.yaml and train_arg_parser.py, its (t, r) sampler "v0", marked "used in
paper"): Adam lr 6e-4, betas (0.9, 0.999); 128 images per GPU; 16,000 epochs with 200 warm-up epochs; dropout 0.2;
both times from lognorm(-2.0, 2.0) in their time (t = 0 data), i.e. ``meanflow.time_mean = 2.0``, ``time_std = 2.0``
here (t = 0 noise); 75% of the pairs with r != t; adaptive weight p = 0.75, c = 1e-3, on the squared error summed over
the pixels (``training.reduce_mean = False``); the network given t and t - r as they are, in [0, 1]
(``model.time_scale = model.interval_scale = 1``, not the published 999); EMA 0.9999 (their extra EMAs 0.99995 and
0.9996 are not kept here).

Not confirmed, or not the paper's: the global batch of 1024 assumes 8 GPUs x 128 (their batch size is per GPU; the
GPU count was not checked), so 16,000 epochs of 50,000 images are ~781k updates (800k here) and 200 warm-up epochs
~9.8k (10k here); their U-Net is EDM's DDPM++ (~55M) with EDM's augmentation pipeline (``use_edm_aug``), ours the
published DDPM++ (61.8M, plus the interval embedding) with random flips only; gradient clipping in their loop was
not checked (the 1-RF's clip 1.0 is kept). Samples, grids and the eval sweep are MeanFlow jumps at 1 and 2 steps.
"""
from configs.default_cifar10_configs import get_default_configs


def set_meanflow(config, time_mean=2.0, time_std=2.0, interval_fraction=0.75, adaptive_weight_power=None,
                 end_time=None, target='jvp', time_distribution='logit_normal', uniform_pair_fraction=0.0):
  """The MeanFlow objective, network and sampler on a config (defaults: the paper's CIFAR-10 settings); the
  training settings stay the config's own. ``adaptive_weight_power``: None gives the paper's 0.75, or 0 (the
  squared error) for the split target, which a weight of p > 0 collapses to u = 0 (``SplitMeanFlow``).
  ``end_time`` (mean, std): the second time of a pair from its own logit-normal (``meanflow.separate_end_times``).
  ``time_distribution``: that of both draws of a pair (the logit-normal's mean and std are unused by another).
  ``uniform_pair_fraction``: the share of pairs drawn uniform instead (``meanflow.uniform_pair_fraction``).
  ``target``: 'jvp' (MeanFlow's), 'split' (SplitMeanFlow's) or 'imf' (improved MeanFlow's), ``meanflow.target``."""
  config.training.objective = 'meanflow'
  config.training.reduce_mean = False  # ||u - u_tgt||^2 summed over the pixels, as their loss.
  config.model.time_inputs = 2
  config.model.time_scale = config.model.interval_scale = 1.0  # Their network sees t and t - r raw, in [0, 1].
  m = config.meanflow
  m.time_distribution = time_distribution
  m.time_mean, m.time_std = time_mean, time_std
  m.interval_fraction = interval_fraction
  m.separate_end_times = end_time is not None
  m.uniform_pair_fraction = uniform_pair_fraction
  if end_time is not None:
    m.end_time_mean, m.end_time_std = end_time
  if adaptive_weight_power is None:
    adaptive_weight_power = 0.0 if target == 'split' else 0.75
  m.adaptive_weight_power, m.adaptive_weight_constant = adaptive_weight_power, 1e-3
  m.target = target
  config.sampling.use_ode_sampler = 'mean_flow'
  config.sampling.sample_N = 1
  config.sampling.sample_steps = (1, 2)
  return config


def get_config():
  config = set_meanflow(get_default_configs())
  training = config.training
  training.batch_size = 1024
  training.n_iters = 800000
  training.snapshot_freq = 50000
  config.eval.end_ckpt = 16
  config.eval.batch_size = 1024
  config.model.dropout = 0.2
  config.model.ema_rate = 0.9999
  optim = config.optim
  optim.lr = 6e-4
  optim.warmup = 10000
  return config
