"""What the published CIFAR-10 reflow configs share: DDPM++ with dropout 0.1, EMA 0.9999, snapshots every 20k."""
from configs.default_cifar10_configs import get_default_configs


def get_reflow_config(reflow_type, reflow_t_schedule, reflow_loss):
  config = get_default_configs()
  config.training.snapshot_freq = 20000
  config.model.dropout = 0.1
  config.model.ema_rate = 0.9999
  config.reflow.reflow_type = reflow_type
  config.reflow.reflow_t_schedule = reflow_t_schedule
  config.reflow.reflow_loss = reflow_loss
  return config
