"""imagenet256_latent_dit_b2.py with DiT-XL/2 (28 blocks of width 1152, 16 heads, 2x2 patches; Peebles & Xie 2023,
Table 1), every other setting the same. DiT-XL/2 reports FID 2.27 with guidance after 7M updates and SiT-XL/2 2.06
(their samplers and reference batch; see the B/2 config for what differs here)."""
from configs.rectified_flow.imagenet256_latent_dit_b2 import get_config as get_dit_b2_config


def get_config():
  config = get_dit_b2_config()
  config.model.dit_size = 'XL'
  return config
