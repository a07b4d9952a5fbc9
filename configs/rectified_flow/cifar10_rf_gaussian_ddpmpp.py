"""1-rectified flow on CIFAR-10 with DDPM++ (Liu et al. 2022, Table 1): 61,804,419 parameters."""
from configs.default_cifar10_configs import get_default_configs


def get_config():
  return get_default_configs()
