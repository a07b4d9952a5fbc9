"""A class-conditional rectified flow (SiT-style: a linear path with velocity prediction) with DiT-B/2 on the latents
of 256x256 ImageNet, the setting of Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023; DiT) and
Ma et al., "SiT: Exploring Flow and Diffusion-based Generative Models with Scalable Interpolant Transformers" (ECCV
2024), who train SiT with DiT's settings.

Sources of the settings (DiT, Sec. 4, "Training" and "Diffusion"; SiT, Sec. 3 and 4, which keeps them): images
center-cropped to 256x256, random horizontal flips, the latents of Stable Diffusion's VAE (sd-vae-ft-ema on the
Hugging Face hub, 32x32x4 latents at 256x256, scaled by its scaling_factor 0.18215); AdamW with lr 1e-4 constant, no
weight decay, no warm-up, batch 256, EMA decay 0.9999; class-conditional on the 1000 classes with 10% of labels
dropped for classifier-free guidance; DiT-B/2: 12 blocks of width 768, 12 heads, 2x2 patches (Table 1). Their main
comparison is at 400K updates (DiT, Table 4).

Not the papers', or not confirmed: the 1000 class folders are read as ``data.root`` (ILSVRC-2012's train folder,
one sub-folder per class) by the image-folder reader (resize of the shorter side and centre crop, bicubic; ADM's
crop, which DiT uses, first halves the image with a box filter); the training times are uniform on [time_eps, 1]
as the rectified flow's (SiT's linear interpolant samples t uniformly); gradient clipping is kept at 1.0 (DiT's loop
was not checked for it); samples are RK45 solves with guidance scale 1.5 on every latent channel (DiT's FID-50K
guidance applies it to three of the four channels); the FID reference statistics are those ``--mode stats`` makes
from the training images, not ADM's reference batch, so FIDs are not comparable with the papers' tables as they
are. The latents are encoded once into ``latent.cache_dir`` (about 42 GB for the two views of 1.28M images in
float16).
"""
from configs.default_cifar10_configs import get_default_configs


def get_config():
  config = get_default_configs()
  training = config.training
  training.batch_size = 256
  training.n_iters = 400000
  training.snapshot_freq = 50000
  training.snapshot_freq_for_preemption = 5000
  training.eval_freq = 10 ** 9  # The held-out split of an image folder is its training images.
  training.label_dropout = 0.1

  data = config.data
  data.dataset = 'IMAGE_FOLDER'
  data.root = 'data/imagenet/train'
  data.image_size = 256
  data.random_flip = True
  data.num_workers = 8

  latent = config.latent
  latent.autoencoder = 'stabilityai/sd-vae-ft-ema'
  latent.cache_dir = 'data/imagenet_latents'

  model = config.model
  model.name = 'dit'
  model.dit_size = 'B'
  model.patch_size = 2
  model.dropout = 0.0
  model.num_classes = 1000
  model.ema_rate = 0.9999

  optim = config.optim
  optim.optimizer = 'AdamW'
  optim.lr = 1e-4
  optim.weight_decay = 0.0
  optim.warmup = 0

  config.sampling.guidance_scale = 1.5
  evaluate = config.eval
  evaluate.batch_size = 250
  evaluate.num_samples = 50000
  evaluate.begin_ckpt = 1
  evaluate.end_ckpt = 8
  evaluate.enable_bpd = False
  return config
