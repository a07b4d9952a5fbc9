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
    self.shadow_params = [p.detach().clone() for p in parameters if p.requires_grad]
    # The update count lives on the shadows' device, so that an update can be applied or skipped without a host read.
    device = self.shadow_params[0].device if self.shadow_params else torch.device('cpu')
    self._count = torch.zeros((), dtype=torch.int64, device=device) if use_num_updates else None
    self.collected_params = []

  @property
  def num_updates(self):
    """Updates applied so far (None when the decay does not ramp up); reading it waits for the device."""
    return None if self._count is None else int(self._count)

  @num_updates.setter
  def num_updates(self, value):
    if value is None:
      self._count = None
    elif self._count is not None:
      self._count.fill_(int(value))  # In place: a captured update reads this memory.
    else:
      device = self.shadow_params[0].device if self.shadow_params else torch.device('cpu')
      self._count = torch.tensor(int(value), dtype=torch.int64, device=device)

  @staticmethod
  def _trainable(parameters):
    return [p for p in parameters if p.requires_grad]

  @torch.no_grad()
  def update(self, parameters, apply=None):
    """shadow <- shadow + (1 - d) (param - shadow) with d = min(decay, (1 + n) / (10 + n)) after n updates.

    ``apply``: an optional boolean tensor; where it is False the shadows and the count stay exactly as they are.
    Decay and weight w = 1 - d are computed on the device (float64, then the shadows' dtype): nothing waits for the
    host.
    """
    params = self._trainable(parameters)
    if not params:
      return
    decay = self._decay_tensor()
    if self._count is not None:
      if apply is None:
        self._count += 1
      else:
        self._count += apply.to(torch.int64)
      count = self._count.to(torch.float64)
      decay = torch.minimum(decay, (1.0 + count) / (10.0 + count))
    weight = 1.0 - decay
    if apply is not None:
      weight = weight * apply.to(torch.float64)
    # shadow += w (param - shadow) as three foreach operators: _foreach_lerp_ reads a tensor weight on the host.
    difference = torch._foreach_sub(params, self.shadow_params)
    torch._foreach_mul_(difference, weight.to(self.shadow_params[0].dtype))
    torch._foreach_add_(self.shadow_params, difference)

  def _decay_tensor(self):
    """The decay as a float64 tensor on the shadows' device, made once per value: making it copies from the host,
    which a CUDA-graph capture of the update (``cuda_graphs.GraphedTrainStep``) does not allow."""
    device = self.shadow_params[0].device
    cached = getattr(self, '_decay_cache', None)
    if cached is None or cached[1].device != device:
      self._decay_cache = (self.decay, torch.tensor(self.decay, dtype=torch.float64, device=device))
    elif cached[0] != self.decay:  # In place: a captured update reads this memory.
      cached[1].fill_(self.decay)
      self._decay_cache = (self.decay, cached[1])
    return self._decay_cache[1]

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
    with torch.no_grad():  # In place, so that the shadows keep their memory (a captured update reads it).
      for mine, theirs in zip(self.shadow_params, shadows):
        mine.copy_(theirs)
    self.num_updates = state['num_updates']
