"""Demo: the digits demo (digits_rf_gaussian_ddpmpp_demo.py) with a tiny DiT (Peebles & Xie 2023) in place of its
DDPM++, every other setting the same (CPU, no download): 2 x 2 patches of the 16 x 16 digits (64 tokens), 4 blocks of
width 128 with 4 heads, about as many parameters as the demo's DDPM++."""
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as get_ddpmpp_config


def get_config():
  config = get_ddpmpp_config()
  model = config.model
  model.name = 'dit'
  model.patch_size = 2
  model.dit_size = 'custom'
  model.dit_depth = 4
  model.dit_hidden_size = 128
  model.dit_num_heads = 4
  return config
