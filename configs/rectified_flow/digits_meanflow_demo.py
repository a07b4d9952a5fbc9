"""Demo: the digits demo's DDPM++ trained as a MeanFlow from scratch (CPU, no download), with the CIFAR-10 settings
of cifar10_meanflow.py (75% intervals, logit-normal times of mean 2 and std 2 here, adaptive weight p = 0.75); snapshot
grids and the eval sweep sample at 1 and 2 steps, the sweep measuring the digits' Frechet distance
(eval.metrics_backend = 'digits'). One MeanFlow update costs about 2.5 rectified-flow updates here
(docs/benchmarks.md)."""
from configs.rectified_flow.cifar10_meanflow import set_meanflow
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as get_demo_config


def get_config():
  config = set_meanflow(get_demo_config())
  config.eval.metrics_backend = 'digits'
  return config
