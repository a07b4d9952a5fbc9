"""k-step distillation (k > 1; here k = 2, override reflow.reflow_t_schedule for others)."""
from configs.rectified_flow.cifar10_reflow_defaults import get_reflow_config


def get_config():
  return get_reflow_config('train_reflow', '2', 'l2')
