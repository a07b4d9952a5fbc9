"""Reflow with pairs generated online by a 20-step Euler teacher."""
from configs.rectified_flow.cifar10_reflow_defaults import get_reflow_config


def get_config():
  return get_reflow_config('train_online_reflow', 'uniform', 'l2')
