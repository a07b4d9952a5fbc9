"""Digits demo: a 2-rectified flow++ in place of stage '2rf' (see configs/rectified_flow/digits_reflow_demo.py).

The same pairs of the 1-RF, the same start and training length as '2rf', with the 2-RF++ objective of
cifar10_2rfpp_train.py (U-shaped times, LPIPS-Huber, the student from the 1-RF's EMA weights); its grids and
evaluations are one Euler step (1 NFE), as the distilled stage's are.
"""
from configs.rectified_flow.cifar10_2rfpp_train import set_2rfpp_recipe
from configs.rectified_flow.digits_reflow_demo import get_stage_config


def get_config():
  config = set_2rfpp_recipe(get_stage_config('2rf'))
  config.sampling.use_ode_sampler = 'euler'
  config.sampling.sample_N = 1
  return config
