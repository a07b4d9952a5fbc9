"""Config -> library adapters: the rectified flow, the optimiser and the one step function."""
import torch

from models import VelocityField
from rectified_flow_pytorch import RectifiedFlow


def build_rectified_flow(config, net):
  """The library's ``RectifiedFlow`` around ``net``; the time scaling to t*999 lives in ``VelocityField``."""
  return RectifiedFlow(VelocityField(net), time_cond_kwarg='times', noise_std=config.sampling.init_noise_scale,
                       time_eps=config.training.time_eps,
                       loss_reduction='mean' if config.training.reduce_mean else 'sum')


def get_optimizer(config, params):
  """Adam with the configured lr, (beta1, 0.999), eps and weight decay."""
  optim = config.optim
  if optim.optimizer != 'Adam':
    raise ValueError(f"Unknown optim.optimizer {optim.optimizer!r}; valid optimisers: ['Adam']")
  return torch.optim.Adam(params, lr=optim.lr, betas=(optim.beta1, 0.999), eps=optim.eps,
                          weight_decay=optim.weight_decay)


def learning_rate(config, step):
  """Linear warm-up: lr * min(step / warmup, 1), where ``step`` counts the updates already made (published)."""
  warmup = config.optim.warmup
  return config.optim.lr * min(step / warmup, 1.0) if warmup > 0 else config.optim.lr


def get_step_fn(config, flow, optimizer, ema, train):
  """One update (``train=True``) or one held-out loss on the EMA weights (``train=False``).

  The returned ``step_fn(state, batch)`` takes ``state = {'model', 'ema', 'optimizer', 'step'}`` and a batch in
  model space, and returns the scalar loss (a detached tensor).
  """
  params = [p for p in flow.parameters() if p.requires_grad]

  def train_step(state, batch):
    flow.train()
    optimizer.zero_grad(set_to_none=True)
    loss = flow(batch)
    loss.backward()
    for group in optimizer.param_groups:
      group['lr'] = learning_rate(config, state['step'])
    if config.optim.grad_clip >= 0:
      torch.nn.utils.clip_grad_norm_(params, max_norm=config.optim.grad_clip)
    optimizer.step()
    state['step'] += 1
    ema.update(params)
    return loss.detach()

  @torch.no_grad()
  def eval_step(state, batch):
    flow.eval()
    with ema.average_parameters(params):
      loss = flow(batch)
    return loss.detach()

  return train_step if train else eval_step
