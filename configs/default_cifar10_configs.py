"""Defaults shared by the CIFAR-10 rectified-flow configs (values of the published runs)."""
import ml_collections


def get_default_configs():
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch of images per optimiser update.
  training.n_iters = 1300000  # Number of optimiser updates in the run.
  training.snapshot_freq = 100000  # Every this many updates write checkpoints/checkpoint_{step // snapshot_freq}.pth.
  training.snapshot_freq_for_preemption = 10000  # Every this many updates refresh checkpoints-meta/checkpoint.pth.
  training.snapshot_sampling = True  # Write an EMA sample grid with each snapshot checkpoint.
  training.log_freq = 50  # Every this many updates log the training loss (TensorBoard, metrics.jsonl).
  training.eval_freq = 100  # Every this many updates log the loss on a held-out batch.
  training.reduce_mean = True  # Per-sample loss: mean (True) or sum (False) of squared errors over pixels.
  training.time_eps = 1e-3  # Training times t ~ U[time_eps, 1]; samplers integrate from time_eps to 1.

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.init_noise_scale = 1.0  # Std of the Gaussian source X0 in training and sampling.
  sampling.use_ode_sampler = 'rk45'  # 'rk45' (adaptive Dormand-Prince) or 'euler'.
  sampling.ode_tol = 1e-5  # rtol = atol of the RK45 sampler.
  sampling.sample_N = 1000  # Number of steps of the Euler sampler.
  sampling.snapshot_batch_size = 64  # Images in each snapshot sample grid.

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'  # Registered dataset name (datasets.registered_datasets()).
  data.root = 'data'  # Folder holding (or receiving) the dataset files.
  data.download = False  # Download the dataset into data.root if it is missing.
  data.image_size = 32  # Height = width of the images fed to the model.
  data.num_channels = 3  # Image channels.
  data.random_flip = True  # Random horizontal flips in training.
  data.centered = True  # Scale images to [-1, 1] (True) or keep [0, 1] (the model then maps x to 2x - 1).
  data.uniform_dequantization = False  # Add U[0, 1) / 256 noise to the 8-bit pixel values in training.
  data.num_workers = 4  # Data-loader worker processes.

  config.model = model = ml_collections.ConfigDict()
  model.name = 'ncsnpp'  # Registered network (models.registered_models()).
  model.ema_rate = 0.999999  # EMA decay of the weights used for sampling and evaluation.
  model.sigma_min = 0.01  # Smallest sigma of the stored `sigmas` buffer (kept for checkpoint compatibility).
  model.sigma_max = 50  # Largest sigma of the `sigmas` buffer.
  model.num_scales = 1000  # Length of the `sigmas` buffer.
  model.dropout = 0.15  # Dropout rate in the residual blocks.
  model.scale_by_sigma = False  # Divide the output by the network time input (NCSN++ 256 models).
  model.normalization = 'GroupNorm'  # Normalisation layer.
  model.nonlinearity = 'swish'  # Activation function.
  model.nf = 128  # Base channel count.
  model.ch_mult = (1, 2, 2, 2)  # Channel multiplier of each resolution level.
  model.num_res_blocks = 4  # Residual blocks per level on the way down (one more on the way up).
  model.attn_resolutions = (16,)  # Resolutions with self-attention.
  model.resamp_with_conv = True  # Learned resampling in the non-BigGAN variants.
  model.conditional = True  # Condition on time.
  model.fir = False  # FIR-filtered up/down sampling.
  model.fir_kernel = [1, 3, 3, 1]  # FIR filter taps.
  model.skip_rescale = True  # Scale residual sums by 1/sqrt(2).
  model.resblock_type = 'biggan'  # Residual block family.
  model.progressive = 'none'  # Progressive output path.
  model.progressive_input = 'none'  # Progressive input path.
  model.progressive_combine = 'sum'  # How progressive paths are merged.
  model.attention_type = 'ddpm'  # Attention block family.
  model.init_scale = 0.0  # Init scale of the last layer of each block (0 -> near-zero init).
  model.embedding_type = 'positional'  # Time embedding: 'positional' or 'fourier'.
  model.fourier_scale = 16  # Scale of the Fourier time features.
  model.conv_size = 3  # Convolution kernel size.

  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = 'Adam'  # Optimiser name.
  optim.lr = 2e-4  # Peak learning rate.
  optim.beta1 = 0.9  # Adam beta1 (beta2 is 0.999).
  optim.eps = 1e-8  # Adam epsilon.
  optim.weight_decay = 0.0  # L2 weight decay.
  optim.warmup = 5000  # Linear learning-rate warm-up, in updates.
  optim.grad_clip = 1.0  # Gradient-norm clip (a negative value disables clipping).

  config.seed = 42  # Seeds parameters, data order, noise and times.
  return config
