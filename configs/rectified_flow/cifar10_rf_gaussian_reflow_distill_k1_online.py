"""One-step distillation with online pairs and LPIPS (published distill k=1 online)."""
from configs.rectified_flow.cifar10_reflow_defaults import get_reflow_config


def get_config():
  return get_reflow_config('train_online_reflow', 't0', 'lpips')
