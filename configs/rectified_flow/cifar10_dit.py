"""1-rectified flow on CIFAR-10 in pixel space with a DiT (Peebles & Xie 2023) of U-ViT-S/2's size, trained with
U-ViT's CIFAR-10 settings: the transformer counterpart of cifar10_rf_gaussian_ddpmpp.py, every other setting (the
rectified flow, its times, the eval sweep) that config's.

Source: Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models" (CVPR 2023; U-ViT), whose U-ViT-S/2
reaches FID 3.11 on unconditional CIFAR-10, and its released config cifar10_uvit_small.py: 2x2 patches of the 32x32
images (256 tokens), width 512, 8 heads, MLP ratio 4, 13 blocks (the config's depth 12 plus U-ViT's middle block);
AdamW with lr 4e-4, betas (0.99, 0.999), weight decay 0.03, a linear warm-up over 2,500 updates, then constant; batch
512 for 200K updates; random horizontal flips; EMA decay 0.9999 (the training script's default); no gradient
clipping.

Not U-ViT's: the network is a DiT (adaLN-Zero conditioning on the time embedding, no long skip connections, the time
not a token, biases in the attention's projections), so it has more parameters than U-ViT-S's 44M (each block's adaLN
adds 6 x 512^2): 62,373,900, about as many as the DDPM++ of cifar10_rf_gaussian_ddpmpp.py (61,804,419); U-ViT trains a
noise-predicting VP-SDE and samples with DPM-Solver, this config a rectified flow sampled with RK45; dropout 0 (U-ViT
has none). The FID 3.11 is U-ViT's, not a measurement of this config.
"""
from configs.default_cifar10_configs import get_default_configs


def get_config():
  config = get_default_configs()
  training = config.training
  training.batch_size = 512
  training.n_iters = 200000
  training.snapshot_freq = 10000

  model = config.model
  model.name = 'dit'
  model.dit_size = 'custom'
  model.patch_size = 2
  model.dit_depth = 13
  model.dit_hidden_size = 512
  model.dit_num_heads = 8
  model.dropout = 0.0
  model.ema_rate = 0.9999

  optim = config.optim
  optim.optimizer = 'AdamW'
  optim.lr = 4e-4
  optim.beta1 = 0.99
  optim.weight_decay = 0.03
  optim.warmup = 2500
  optim.grad_clip = -1.0
  return config
