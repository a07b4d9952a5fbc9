"""The one batch type of every stream: training, held-out and reflow-pair micro-batches."""
from typing import NamedTuple, Optional

import torch


class Batch(NamedTuple):
  """A (micro-)batch in model space, its parts named (in the spirit of flow_matching's ``PathSample``).

  ``x0``: the source points of the paths (reflow pairs' z0), or None where the loss draws Gaussian noise (1-RF);
  ``x1``: the targets (images, or the teacher's z1); ``rows``: this micro-batch's slice of the global batch, whose
  noise and times are drawn whole and sliced; ``labels``: (B,) int64 classes of a class-conditional run, else None.
  """
  x0: Optional[torch.Tensor]
  x1: torch.Tensor
  rows: slice = slice(None)
  labels: Optional[torch.Tensor] = None

  def to(self, device, non_blocking=False):
    """The batch with its tensors on ``device``."""
    def move(tensor):
      return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

    return self._replace(x0=move(self.x0), x1=move(self.x1), labels=move(self.labels))


def collate(items):
  """The ``collate_fn`` of every data loader of the framework: dataset items as one ``Batch``.

  An image dataset's items are images (``Batch(None, images)``) or, class-conditional, (image, label) pairs
  (``Batch(None, images, labels=labels)``); reflow pair shards' items are ``Batch(z0, z1, labels=label or None)``,
  stacked field by field.
  """
  first = items[0]
  if isinstance(first, Batch):
    return Batch(x0=torch.stack([item.x0 for item in items]), x1=torch.stack([item.x1 for item in items]),
                 labels=None if first.labels is None else torch.as_tensor([item.labels for item in items]))
  if isinstance(first, (tuple, list)):
    return Batch(None, torch.stack([image for image, _ in items]),
                 labels=torch.as_tensor([label for _, label in items]))
  return Batch(None, torch.stack(items))
