"""1-rectified flow on CelebA-HQ 256x256 (an image folder of the 30,000 images) with NCSN++ (65,574,549 parameters)."""
from configs.default_lsun_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.data.dataset = 'CelebA-HQ-Pytorch'
  config.data.centered = True
  config.eval.stats_path = 'assets/stats/celeba_hq_256_stats.npz'
  return config
