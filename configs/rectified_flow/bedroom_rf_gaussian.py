"""1-rectified flow on LSUN bedroom 256x256 from its LMDB export with NCSN++ (65,574,549 parameters)."""
from configs.default_lsun_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.data.dataset = 'LSUN'
  config.data.category = 'bedroom'
  config.data.centered = False
  config.eval.stats_path = 'assets/stats/lsun_bedroom_256_stats.npz'
  return config
