"""Exponential moving average of trainable parameters, in the published checkpoint format."""
import contextlib

import torch


class ExponentialMovingAverage:
  """Shadow copies of the trainable parameters.

  After n updates the effective decay is min(decay, (1 + n) / (10 + n)), so early averages are not dominated by
  the random initialisation. ``state_dict()`` is ``{'decay', 'num_updates', 'shadow_params'}`` with the shadows
  listed in the order of ``model.parameters()`` (trainable ones only), as in released checkpoints.
  """

  def __init__(self, parameters, decay, use_num_updates=True):
    if not 0.0 <= decay <= 1.0:
      raise ValueError(f'EMA decay must be in [0, 1], got {decay}')
    self.decay = decay
    self.num_updates = 0 if use_num_updates else None
    self.shadow_params = [p.detach().clone() for p in parameters if p.requires_grad]
    self.collected_params = []

  @staticmethod
  def _trainable(parameters):
    return [p for p in parameters if p.requires_grad]

  @torch.no_grad()
  def update(self, parameters):
    decay = self.decay
    if self.num_updates is not None:
      self.num_updates += 1
      decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
    params = self._trainable(parameters)
    torch._foreach_lerp_(self.shadow_params, [p.detach() for p in params], 1.0 - decay)

  @torch.no_grad()
  def copy_to(self, parameters):
    for shadow, param in zip(self.shadow_params, self._trainable(parameters)):
      param.copy_(shadow)

  def store(self, parameters):
    self.collected_params = [p.detach().clone() for p in parameters]

  @torch.no_grad()
  def restore(self, parameters):
    for saved, param in zip(self.collected_params, parameters):
      param.copy_(saved)
    self.collected_params = []

  @contextlib.contextmanager
  def average_parameters(self, parameters):
    """Temporarily load the EMA weights into ``parameters`` (a list), restoring the raw weights on exit."""
    parameters = list(parameters)
    self.store(parameters)
    self.copy_to(parameters)
    try:
      yield
    finally:
      self.restore(parameters)

  def state_dict(self):
    return {'decay': self.decay, 'num_updates': self.num_updates, 'shadow_params': self.shadow_params}

  def load_state_dict(self, state):
    shadows = state['shadow_params']
    if len(shadows) != len(self.shadow_params):
      raise ValueError(f'EMA state has {len(shadows)} shadow parameters but the model has '
                       f'{len(self.shadow_params)} trainable parameters: the checkpoint is for another architecture')
    for i, (mine, theirs) in enumerate(zip(self.shadow_params, shadows)):
      if mine.shape != theirs.shape:
        raise ValueError(f'EMA shadow parameter {i} has shape {tuple(theirs.shape)} in the checkpoint but '
                         f'{tuple(mine.shape)} in the model')
    self.decay = state['decay']
    self.num_updates = state['num_updates']
    self.shadow_params = [s.detach().clone().to(m.device, m.dtype) for m, s in zip(self.shadow_params, shadows)]
