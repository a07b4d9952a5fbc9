"""``RectifiedFlow``: wrap any velocity network, get the training loss and a sampler."""
import torch
from torch import nn

from rectified_flow_pytorch import flow, solvers


class RectifiedFlow(nn.Module):
  """A rectified flow from Gaussian noise (t = 0) to data (t = 1) around ``model``.

  Args:
    model: any ``nn.Module`` mapping (x, time) to a velocity shaped like x.
    time_cond_kwarg: keyword under which the model receives the (B,) time in [0, 1]; ``None`` for a model
      without a time input (it is then called as ``model(x)``).
    noise_std: standard deviation of the Gaussian source X0 ~ N(0, noise_std^2 I).
    time_eps: training times are drawn from U[time_eps, 1] and samplers start at time_eps (published: 1e-3).
    loss_reduction: per-sample reduction of the squared error over data dimensions, 'mean' (published) or 'sum'.
  """

  def __init__(self, model, *, time_cond_kwarg='times', noise_std=1.0, time_eps=1e-3, loss_reduction='mean'):
    super().__init__()
    if not 0.0 <= time_eps < 1.0:
      raise ValueError(f'time_eps must be in [0, 1), got {time_eps}')
    self.model = model
    self.time_cond_kwarg = time_cond_kwarg
    self.noise_std = noise_std
    self.time_eps = time_eps
    self.loss_reduction = loss_reduction
    self.data_shape = None
    self.last_sample_nfe = None

  def velocity(self, x, times, **model_kwargs):
    """v(x, t) for a (B, ...) batch and (B,) times in [0, 1]."""
    if self.time_cond_kwarg is None:
      return self.model(x, **model_kwargs)
    return self.model(x, **{self.time_cond_kwarg: times}, **model_kwargs)

  def sample_noise(self, shape, device=None, dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype) * self.noise_std

  def per_sample_loss(self, data, noise=None, times=None, **model_kwargs):
    """Squared velocity error of each sample, (B,): ||v(X_t, t) - (X1 - X0)||^2, divided by d for 'mean'."""
    if self.data_shape is None:
      self.data_shape = tuple(data.shape[1:])
    if noise is None:
      noise = self.sample_noise(data.shape, device=data.device, dtype=data.dtype)
    if times is None:
      times = flow.sample_uniform_times(data.shape[0], eps=self.time_eps, device=data.device, dtype=data.dtype)
    x_t = flow.interpolate(noise, data, times)
    prediction = self.velocity(x_t, times, **model_kwargs)
    return flow.per_sample_squared_error(prediction, flow.velocity_target(noise, data), self.loss_reduction)

  def forward(self, data, noise=None, times=None, **model_kwargs):
    """The training loss: the batch mean of ``per_sample_loss``."""
    return self.per_sample_loss(data, noise=noise, times=times, **model_kwargs).mean()

  def _device(self):
    param = next(self.model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')

  @torch.no_grad()
  def sample(self, batch_size=1, steps=16, noise=None, data_shape=None, solver='euler', rtol=1e-5, atol=1e-5,
             **model_kwargs):
    """Integrates the flow from noise (t = time_eps) to data (t = 1).

    ``steps`` is the number of Euler steps (steps=1 is exactly one network evaluation, x1 = x0 + v(x0, eps));
    the adaptive ``solver='rk45'`` ignores it and uses ``rtol``/``atol``. The NFE of the call is stored in
    ``self.last_sample_nfe``.
    """
    if noise is None:
      shape = data_shape or self.data_shape
      if shape is None:
        raise ValueError('The data shape is unknown: call the flow on a data batch first, or pass data_shape= '
                         'or noise=')
      noise = self.sample_noise((batch_size, *shape), device=self._device())

    def velocity(x, t):
      return self.velocity(x, t, **model_kwargs)

    if solver == 'euler':
      x1, nfe = solvers.euler(velocity, noise, steps=steps, eps=self.time_eps)
    elif solver == 'rk45':
      x1, nfe = solvers.rk45(velocity, noise, t0=self.time_eps, t1=1.0, rtol=rtol, atol=atol)
    else:
      raise ValueError(f'Unknown solver {solver!r}; valid solvers: {sorted(solvers.SOLVERS)}')
    self.last_sample_nfe = nfe
    return x1
