"""Demo: the digits demo's DDPM++ as a class-conditional 1-rectified flow with classifier-free guidance (CPU, no
download). Labels are the digits 0-9; one in ten is replaced by the null class in training, and samples are guided
with w = 2 (v = v_null + 2 (v_cond - v_null)) where t >= 0.5, the half of the path nearer the data (guided over all
of t, the samples of a digit lose much of their variety: docs/digits.md); snapshot grids show one row per digit."""
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as get_unconditional_config


def get_config():
  config = get_unconditional_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.guidance_scale = 2.0
  config.sampling.guidance_t_min = 0.5  # Guided only where t >= 0.5 (the half of the path nearer the data).
  config.eval.labels = 'all'
  return config
