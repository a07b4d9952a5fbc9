"""Defaults shared by the CIFAR-10 rectified-flow configs (values of the published runs)."""
import ml_collections


def get_default_configs():
  config = ml_collections.ConfigDict()

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # Global batch of images per optimiser update.
  training.n_iters = 1300000  # Number of optimiser updates in the run.
  training.snapshot_freq = 100000  # Every this many updates write checkpoints/checkpoint_{step // snapshot_freq}.pth.
  training.snapshot_freq_for_preemption = 10000  # Every this many updates write checkpoints-meta/checkpoint_{step}.pth.
  training.keep_preemption_checkpoints = 3  # Newest preemption checkpoints kept (an unreadable one falls back).
  training.max_nonfinite_steps = 20  # Updates skipped for a non-finite loss/gradient before the run stops.
  training.snapshot_sampling = True  # Write an EMA sample grid with each snapshot checkpoint.
  training.sample_grid_steps = ()  # Further updates with an EMA sample grid (no checkpoint), e.g. an early look.
  training.log_freq = 50  # Every this many updates log the training loss (TensorBoard, metrics.jsonl).
  training.eval_freq = 100  # Every this many updates log the loss on a held-out batch.
  training.reduce_mean = True  # Per-sample loss: mean (True) or sum (False) of squared errors over pixels.
  training.grad_accum_steps = 1  # Micro-batches per update on each process (global batch = batch_size either way).
  training.precision = 'auto'  # Autocast: 'fp32' (published), 'bf16', 'fp16' (grad scaler); 'auto': losses.py.
  training.channels_last = False  # NHWC memory format for the network and its inputs (faster with bf16/fp16).
  training.compile = False  # torch.compile the training forward/backward.
  training.cuda_graph = False  # On CUDA, replay each update from one CUDA graph (cuda_graphs.GraphedTrainStep).
  training.allow_tf32 = True  # TF32 matmuls and convolutions on CUDA (no effect on the CPU).
  training.time_eps = 1e-3  # Training times t ~ U[time_eps, 1]; samplers integrate from time_eps to 1.
  training.label_dropout = 0.1  # Class-conditional runs: fraction of labels replaced by the null class (guidance).
  training.objective = 'rectified_flow'  # 'rectified_flow' (published) or 'meanflow' (config.meanflow; time_inputs 2).

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.init_noise_scale = 1.0  # Std of the Gaussian source X0 in training and sampling.
  sampling.use_ode_sampler = 'rk45'  # 'rk45' (adaptive Dormand-Prince), 'euler', or 'mean_flow' (MeanFlow jumps).
  sampling.ode_tol = 1e-5  # rtol = atol of the RK45 sampler.
  sampling.rk45_sync_every = 0  # RK45 steps per host read of its done flag; 0: 4 on CUDA (no per-step sync), 1 on CPU.
  sampling.sample_N = 1000  # Number of steps of the Euler sampler.
  sampling.sigma_variance = 0.0  # > 0: the published stochastic Euler sampler, noise (1 - t) * sigma_variance.
  sampling.ode_state_dtype = 'float32'  # Solver state and step control: 'float32' or 'float64' (scipy's, published).
  sampling.precision = 'fp32'  # Network arithmetic when sampling: 'fp32' or 'bf16' (autocast around the network call).
  sampling.cuda_graph = True  # On CUDA, replay the network call from a CUDA graph captured per batch shape.
  sampling.sample_steps = ()  # Step counts (euler, mean_flow) of the snapshot grids and eval sweep; (): sample_N.
  sampling.snapshot_batch_size = 64  # Images in each snapshot sample grid (class-conditional: rows of classes).
  sampling.guidance_scale = 1.0  # Classifier-free guidance w: v_null + w (v_cond - v_null); 1 = no guidance.
  sampling.guidance_t_min = 0.0  # Guidance acts only where t_min <= t <= t_max (t = 0 noise, 1 data); elsewhere w = 1.
  sampling.guidance_t_max = 1.0

  config.eval = evaluate = ml_collections.ConfigDict()
  evaluate.begin_ckpt = 1  # First checkpoint index of the sweep (checkpoints/checkpoint_{i}.pth).
  evaluate.end_ckpt = 13  # Last checkpoint index of the sweep.
  evaluate.checkpoint_wait_seconds = 0.0  # Wait this long for a missing checkpoint, then skip it.
  evaluate.batch_size = 1024  # Samples per sampling round (RK45 treats a round as one system).
  evaluate.enable_sampling = False  # Sample eval.num_samples images and compute FID / IS / KID / straightness.
  evaluate.num_samples = 50000  # Samples per checkpoint.
  evaluate.enable_figures_only = False  # Only write a sample grid per checkpoint.
  evaluate.enable_loss = False  # Loss of the EMA weights on the held-out split.
  evaluate.enable_bpd = False  # Bits per dimension by the instantaneous change of variables.
  evaluate.bpd_dataset = 'test'  # Split for bpd: 'train' or 'test'.
  evaluate.bpd_num_images = 10000  # Images of that split used for bpd (0: all).
  evaluate.bpd_divergence = 'hutchinson'  # 'hutchinson' (one probe per image) or 'exact' (small images only).
  evaluate.stats_path = 'assets/stats/cifar10_stats.npz'  # Reference statistics (pool_3, or mu and sigma).
  evaluate.stats_num_images = 0  # Training images used by --mode stats (0: all).
  evaluate.inception_weights_path = ''  # Local Inception weights file; empty: torch hub cache, downloaded once.
  evaluate.metrics_backend = 'torch'  # 'torch' (torch-fidelity), 'tfgan' (TF-Hub Inception), 'digits' (digit CNN FD).
  evaluate.inception_score_splits = 10  # Splits of the common IS protocol (the published one-split IS is also given).
  evaluate.kid_subsets = 100  # Random subsets averaged by KID.
  evaluate.kid_subset_size = 1000  # Samples per KID subset.
  evaluate.labels = 'all'  # Class-conditional: 'all' (sample i gets class i mod num_classes) or a list '3,5,7'.

  # training.objective = 'meanflow' (Geng et al. 2025), in this project's time (t = 0 noise, t = 1 data).
  config.meanflow = meanflow = ml_collections.ConfigDict()
  meanflow.time_distribution = 'logit_normal'  # Each of the two times of a pair (flow_math.TIME_DISTRIBUTIONS).
  meanflow.time_mean = 0.4  # Logit-normal mean and std; the paper's lognorm(m, s) is (-m, s) here.
  meanflow.time_std = 1.0
  meanflow.interval_fraction = 0.25  # Pairs with s > t (the paper's ratio of r != t); the rest are s = t.
  meanflow.separate_end_times = False  # True: a pair's second time from logit_normal(end_time_mean, end_time_std).
  meanflow.end_time_mean = 4.0  # The sampler of two distributions (with time_mean 0.6, std 1.6; s the later time).
  meanflow.end_time_std = 1.6
  meanflow.uniform_pair_fraction = 0.0  # Pairs of two uniform draws instead (a mixture; 0: none).
  meanflow.adaptive_weight_power = 1.0  # p of the weight 1 / (||error||^2 + c)^p (0: none).
  meanflow.adaptive_weight_constant = 1e-3  # c of that weight.
  meanflow.target = 'jvp'  # 'jvp': MeanFlow's identity (forward mode); 'split': SplitMeanFlow's (no forward mode);
  # 'imf': improved MeanFlow's (forward mode along the network's own velocity).
  meanflow.split_point = 'uniform'  # target='split': m = t + lam (s - t), lam ~ U(0, 1); 'midpoint': lam = 1/2.
  meanflow.guidance_scale = 1.0  # Class-conditional: the guidance w trained into the network (1: none).
  meanflow.guidance_mix = 0.0  # kappa of the trained-in guidance (Geng et al. 2025, App. B.1).
  meanflow.guidance_t_min = 0.0  # The trained-in guidance acts where t_min <= t <= t_max.
  meanflow.guidance_t_max = 1.0

  config.reflow = reflow = ml_collections.ConfigDict()
  reflow.reflow_type = 'generate_data_from_z0'  # generate_data_from_z0, train_reflow or train_online_reflow.
  reflow.reflow_t_schedule = 'uniform'  # 'uniform' (k-RF), 't0' (1-step distillation), 't1' (inversion), k, 'u_shaped'.
  reflow.u_shaped_a = 4.0  # 'u_shaped' times: density exp(a t) + exp(a (1 - t)) (2-RF++: a = 4, Lee et al. 2024).
  reflow.reflow_loss = 'l2'  # 'l2', 'lpips', 'lpips+l2' (with 't0'), 'lpips_huber' (2-RF++), 'pseudo_huber'.
  reflow.last_flow_ckpt = ''  # Checkpoint of the teacher flow (pairs come from its EMA weights).
  reflow.init_from_ema = False  # Start the student from the teacher's EMA weights (published: raw weights).
  reflow.data_root = ''  # Folder of the generated pairs (one seed_{seed} subfolder per generating run).
  reflow.total_number_of_samples = 100000  # Pairs to generate per seed.
  reflow.pairs_per_shard = 1024  # Pairs per shard file (one sampler call each).
  reflow.pair_format = 'float32'  # 'float32' (published: z0 and z1) or 'compact' (z1 float16, z0 from seeds).
  reflow.online_teacher_steps = 20  # Euler steps of the teacher in the online variants.
  reflow.teacher_guidance_scale = 1.0  # Online variants: the class-conditional teacher's guidance (students w = 1).
  reflow.teacher_guidance_t_min = 0.0  # Online variants: the times the teacher is guided in (sampling.guidance_t_*).
  reflow.teacher_guidance_t_max = 1.0
  reflow.lpips_weights_path = ''  # Local VGG16 weights for LPIPS; empty: torch hub cache, downloaded once.

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'CIFAR10'  # Registered dataset name (datasets.registered_datasets()).
  data.root = 'data'  # Folder holding (or receiving) the dataset files.
  data.backend = 'torchvision'  # Reader: 'torchvision', or 'tfds' (CIFAR10, image folders; requirements-tf.txt).
  data.category = ''  # LSUN category (e.g. 'bedroom', 'church_outdoor'): data.root/{category}_train_lmdb.
  data.download = False  # Download the dataset into data.root if it is missing.
  data.image_size = 32  # Height = width of the images fed to the model.
  data.num_channels = 3  # Image channels.
  data.random_flip = True  # Random horizontal flips in training.
  data.centered = True  # Scale images to [-1, 1] (True) or keep [0, 1] (the model then maps x to 2x - 1).
  data.uniform_dequantization = False  # Add U[0, 1) / 256 noise to the 8-bit pixel values in training.
  data.num_workers = 4  # Data-loader worker processes.
  data.device_resident = True  # Training images on the training device when they fit (no loader, same order).
  data.device_resident_max_gb = 4.0  # Largest training set (as uint8 for 8-bit images) kept on the device.

  # Latent-space training (datasets/latents.py): the flow learns an autoencoder's latents of the data.image_size
  # images, cached once under data.root/latent_cache/; samples are decoded for grids, FID and the digits' FD.
  config.latent = latent = ml_collections.ConfigDict()
  latent.autoencoder = ''  # '' (pixel space), or a diffusers AutoencoderKL: a local folder, or a hub id (its cache).
  latent.subfolder = ''  # Folder of the autoencoder inside latent.autoencoder (e.g. 'vae' of a pipeline).
  latent.download = False  # Fetch a hub id that is not in the Hugging Face cache (else: an error saying where).
  latent.factors_from_autoencoder = True  # x = (z - shift) * scale with the autoencoder's scaling/shift_factor.
  latent.scale_factor = 1.0  # scale, when latent.factors_from_autoencoder is False.
  latent.shift_factor = 0.0  # shift, when latent.factors_from_autoencoder is False.
  latent.sample_posterior = True  # Train on z ~ N(mean, var) of the encoder (DiT); False: on the mean.
  latent.cache_dtype = 'float16'  # The cached moments: 'float16' (half the disk) or 'float32'.
  latent.encode_batch_size = 64  # Images per autoencoder call (encoding and decoding).
  latent.cache_dir = ''  # Folder of the latent caches; '': data.root/latent_cache.

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
  model.fused_norm = False  # On CUDA: each residual block's GroupNorm + SiLU as one compiled kernel (NHWC-ready).
  model.nf = 128  # Base channel count.
  model.ch_mult = (1, 2, 2, 2)  # Channel multiplier of each resolution level.
  model.num_res_blocks = 4  # Residual blocks per level on the way down (one more on the way up).
  model.attn_resolutions = (16,)  # Resolutions with self-attention.
  model.resamp_with_conv = True  # Learned resampling in the non-BigGAN variants.
  model.conditional = True  # Condition on time.
  model.num_classes = 0  # 0: unconditional (published); N: class-conditional on N classes plus a null class.
  model.time_inputs = 1  # 1: the time t (published); 2: also the length s - t of a step [t, s] (MeanFlow).
  model.time_scale = 999.  # The network's time input is t * time_scale (published: 999, the DDPM timestep scale).
  model.interval_scale = 999.  # time_inputs 2: the network's interval input is (s - t) * interval_scale.
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
  # model.name = 'dit' (Peebles & Xie 2023, on pixels); it also reads dropout, num_classes and time_inputs.
  model.dit_size = 'S'  # S, B, L, XL (depth/width/heads 12/384/6, 12/768/12, 24/1024/16, 28/1152/16) or 'custom'.
  model.patch_size = 2  # Side of the square patches that become tokens (DiT: 2, 4, 8); must divide data.image_size.
  model.dit_depth = 0  # dit_size 'custom': transformer blocks (0 with a named size).
  model.dit_hidden_size = 0  # dit_size 'custom': token width, a multiple of 4 and of the heads (0 with a named size).
  model.dit_num_heads = 0  # dit_size 'custom': attention heads (0 with a named size).

  config.optim = optim = ml_collections.ConfigDict()
  optim.fused = True  # Fused Adam kernel (CUDA and the CPU): skips a non-finite update without a host read.
  optim.optimizer = 'Adam'  # 'Adam' (published: weight decay as an L2 term) or 'AdamW' (decoupled weight decay).
  optim.lr = 2e-4  # Peak learning rate.
  optim.beta1 = 0.9  # Adam beta1 (beta2 is 0.999).
  optim.eps = 1e-8  # Adam epsilon.
  optim.weight_decay = 0.0  # Weight decay: L2 with 'Adam', decoupled with 'AdamW'.
  optim.warmup = 5000  # Linear learning-rate warm-up, in updates.
  optim.grad_clip = 1.0  # Gradient-norm clip (a negative value disables clipping).

  config.seed = 42  # Seeds parameters, data order, noise and times.
  # Open checkpoints that hold objects other than tensors and plain data by full unpickling, which runs code from the
  # file: only for files you trust (default: such files are refused; checkpoints.read_checkpoint).
  config.allow_pickle_checkpoints = False
  config.device = 'auto'  # 'auto' (the LOCAL_RANK GPU when CUDA is present, else the CPU), 'cpu', 'cuda', 'cuda:N'.
  return config
