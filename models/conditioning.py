"""The conditioning inputs beside the time, shared by the networks: a class-conditional network's labels and a
two-time network's interval length, each checked against the network it is given to."""
import torch


def labels_or_null(labels, num_classes, batch, device):
  """The (B,) labels of a network of ``num_classes`` classes (labels in [0, num_classes], num_classes the null class
  of classifier-free guidance): ``labels``, or the null class for every sample when none are given. None for an
  unconditional network (``num_classes`` = 0), which must not be given labels."""
  if not num_classes:
    if labels is not None:
      raise ValueError('labels were given to an unconditional network: set model.num_classes to the number of '
                       'classes to train a class-conditional one')
    return None
  if labels is None:
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)
  return labels


def checked_interval(interval_cond, time_inputs, batch):
  """``interval_cond`` (B,), the step length (s - t) * ``model.interval_scale`` that a network of two times
  (``time_inputs`` = 2) must be given and a network of one time must not (None then)."""
  if time_inputs != 2:
    if interval_cond is not None:
      raise ValueError('interval_cond was given to a network of one time: set model.time_inputs=2 to train a network '
                       'that also takes the interval length s - t (MeanFlow)')
    return None
  if interval_cond is None:
    raise ValueError('a network with model.time_inputs=2 needs interval_cond=(s - t) * model.interval_scale, the '
                     'length of the step [t, s] on the network scale (VelocityField passes it from end_times=s)')
  if interval_cond.shape != (batch,):
    raise ValueError(f'interval_cond has shape {tuple(interval_cond.shape)}; expected ({batch},), one interval length '
                     f'per sample')
  return interval_cond
