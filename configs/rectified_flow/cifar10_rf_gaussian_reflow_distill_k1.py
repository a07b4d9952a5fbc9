"""One-step distillation on generated pairs with LPIPS (published distill k=1)."""
from configs.rectified_flow.cifar10_reflow_defaults import get_reflow_config


def get_config():
  return get_reflow_config('train_reflow', 't0', 'lpips')
