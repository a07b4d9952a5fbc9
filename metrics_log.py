"""Scalars to TensorBoard and to a JSON-lines file; only the writing process (rank 0) creates one."""
import json
import os
import time


class MetricsLog:
  """``log(step, **scalars)`` appends one JSON line to ``workdir/metrics.jsonl`` and writes TensorBoard scalars."""

  def __init__(self, workdir, tensorboard=True, enabled=True):
    self.enabled = enabled
    if not enabled:  # Processes other than rank 0 under torchrun.
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    self._writer = None
    if tensorboard:
      from torch.utils.tensorboard import SummaryWriter
      self._writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def log(self, step, **scalars):
    if not self.enabled:
      return
    scalars = {key: float(value) for key, value in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    if self._writer is not None:
      for key, value in scalars.items():
        self._writer.add_scalar(key, value, step)

  def close(self):
    if not self.enabled:
      return
    self._jsonl.close()
    if self._writer is not None:
      self._writer.close()
