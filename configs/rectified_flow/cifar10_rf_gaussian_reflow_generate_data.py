"""Generate (z0, z1) pairs from a rectified flow for reflow."""
from configs.rectified_flow.cifar10_reflow_defaults import get_reflow_config


def get_config():
  return get_reflow_config('generate_data_from_z0', 'uniform', 'l2')
