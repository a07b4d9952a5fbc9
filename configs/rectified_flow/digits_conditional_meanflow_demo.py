"""Demo: the class-conditional digits demo as a MeanFlow (digits_meanflow_demo.py) with classifier-free guidance
trained into the network (Geng et al. 2025, Sec. 4.2): w = 2 on samples with a label, one label in ten dropped to the
null class, so that one network evaluation per step samples the guided flow (sampling.guidance_scale stays 1)."""
from configs.rectified_flow.cifar10_meanflow import set_meanflow
from configs.rectified_flow.digits_conditional_demo import get_config as get_conditional_config


def get_config():
  config = set_meanflow(get_conditional_config())
  config.sampling.guidance_scale, config.sampling.guidance_t_min = 1.0, 0.0  # Guidance is in the network.
  config.meanflow.guidance_scale = 2.0
  config.eval.metrics_backend = 'digits'
  return config
