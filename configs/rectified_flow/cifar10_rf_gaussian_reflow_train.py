"""Reflow: train the next rectified flow on generated pairs."""
from configs.rectified_flow.cifar10_reflow_defaults import get_reflow_config


def get_config():
  return get_reflow_config('train_reflow', 'uniform', 'l2')
