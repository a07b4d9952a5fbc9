"""1-rectified flow on AFHQ-cat 256x256 (an image folder, e.g. afhq/train/cat) with NCSN++ (65,574,549 parameters)."""
from configs.default_lsun_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.data.dataset = 'AFHQ-CAT-Pytorch'
  config.data.centered = True
  config.eval.stats_path = 'assets/stats/afhq_cat_256_stats.npz'
  return config
