"""Class-conditional digits demo, stage 'pairs_2rf' (see configs/rectified_flow/digits_reflow_demo.py)."""
from configs.rectified_flow.digits_reflow_demo import get_stage_config


def get_config():
  return get_stage_config('pairs_2rf', conditional=True)
