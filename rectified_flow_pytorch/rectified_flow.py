"""``RectifiedFlow`` and ``Reflow``: wrap any network, get the training loss, a sampler and reflow."""
import copy

import torch
from torch import nn

from rectified_flow_pytorch import flow, solvers

LOSSES = ('mse', 'pseudo_huber', 'lpips_huber')


class RectifiedFlow(nn.Module):
  """A rectified flow from Gaussian noise (t = 0) to data (t = 1) around ``model``.

  Args:
    model: any ``nn.Module`` mapping (x, time) to a tensor shaped like x.
    time_cond_kwarg: keyword under which the model receives the (B,) time in [0, 1]; ``None`` for a model
      without a time input (it is then called as ``model(x)``).
    predict: what the model outputs: 'flow' (the velocity X1 - X0, published), 'noise' (X0) or 'clean' (X1).
    time_distribution: training times: 'uniform' (published), 'logit_normal', 'u_shaped' or 'cosmap';
      ``time_distribution_kwargs`` go to it (e.g. ``{'mean': 0.0, 'std': 1.0}``, ``{'a': 4.0}``).
    time_eps: training times are squeezed into [time_eps, 1] (published: 1e-3).
    loss: 'mse' (published), 'pseudo_huber' (c = 0.00054 sqrt(d)), or 'lpips_huber': (pseudo-Huber +
      ``perceptual_loss``) on the data estimate X1_hat, weighted by 1 / (1 - t), i.e. most at the data end
      (Lee et al. 2024's 1/t weighting written in this library's time convention).
    perceptual_loss: for 'lpips_huber', a callable (x1_hat, x1) -> (B,) distances, e.g. an ``lpips.LPIPS``.
    loss_reduction: for 'mse', reduce the squared error over data dimensions by 'mean' (published) or 'sum'.
    noise_std: standard deviation of the Gaussian source X0 ~ N(0, noise_std^2 I).
  """

  def __init__(self, model, *, time_cond_kwarg='times', predict='flow', time_distribution='uniform',
               time_distribution_kwargs=None, time_eps=1e-3, loss='mse', perceptual_loss=None,
               loss_reduction='mean', noise_std=1.0):
    super().__init__()
    if predict not in flow.PREDICTIONS:
      raise ValueError(f'Unknown predict={predict!r}; valid: {list(flow.PREDICTIONS)}')
    if time_distribution not in flow.TIME_DISTRIBUTIONS:
      raise ValueError(f'Unknown time_distribution={time_distribution!r}; valid: {sorted(flow.TIME_DISTRIBUTIONS)}')
    if loss not in LOSSES:
      raise ValueError(f'Unknown loss={loss!r}; valid: {list(LOSSES)}')
    if loss == 'lpips_huber' and perceptual_loss is None:
      raise ValueError("loss='lpips_huber' needs perceptual_loss=, e.g. lpips.LPIPS(net='vgg')")
    if not 0.0 <= time_eps < 1.0:
      raise ValueError(f'time_eps must be in [0, 1), got {time_eps}')
    self.model = model
    self.time_cond_kwarg = time_cond_kwarg
    self.predict = predict
    self.time_distribution = time_distribution
    self.time_distribution_kwargs = dict(time_distribution_kwargs or {})
    self.time_eps = time_eps
    self.loss_name = loss
    self.perceptual_loss = perceptual_loss
    self.loss_reduction = loss_reduction
    self.noise_std = noise_std
    self.data_shape = None
    self.last_sample_nfe = None

  def predict_raw(self, x, times, **model_kwargs):
    """The model's output at (x, t) for a (B, ...) batch and (B,) times in [0, 1]."""
    if self.time_cond_kwarg is None:
      return self.model(x, **model_kwargs)
    return self.model(x, **{self.time_cond_kwarg: times}, **model_kwargs)

  def velocity(self, x, times, **model_kwargs):
    """v(x, t), converted from the model's prediction where it predicts noise or data."""
    return flow.to_velocity(self.predict, self.predict_raw(x, times, **model_kwargs), x, times)

  def sample_noise(self, shape, device=None, dtype=torch.float32, generator=None):
    return torch.randn(shape, device=device, dtype=dtype, generator=generator) * self.noise_std

  def sample_times(self, batch_size, device=None, dtype=torch.float32, generator=None):
    return flow.sample_times(batch_size, self.time_distribution, eps=self.time_eps, device=device, dtype=dtype,
                             generator=generator, **self.time_distribution_kwargs)

  def predict_on_path(self, data, noise=None, times=None, **model_kwargs):
    """Draws (X0, t) where not given and returns (noise, times, X_t, the model's prediction at (X_t, t))."""
    if self.data_shape is None:
      self.data_shape = tuple(data.shape[1:])
    if noise is None:
      noise = self.sample_noise(data.shape, device=data.device, dtype=data.dtype)
    if times is None:
      times = self.sample_times(data.shape[0], device=data.device, dtype=data.dtype)
    x_t = flow.interpolate(noise, data, times)
    return noise, times, x_t, self.predict_raw(x_t, times, **model_kwargs)

  def per_sample_loss(self, data, noise=None, times=None, **model_kwargs):
    """The loss of each sample, (B,)."""
    noise, times, x_t, prediction = self.predict_on_path(data, noise, times, **model_kwargs)
    if self.loss_name == 'lpips_huber':
      clean = flow.to_clean(self.predict, prediction, x_t, times)
      weight = 1.0 / (1.0 - times).clamp(min=1e-3)
      return weight * (flow.per_sample_pseudo_huber(clean, data) + self.perceptual_loss(clean, data).reshape(-1))
    target = flow.prediction_target(self.predict, noise, data)
    if self.loss_name == 'pseudo_huber':
      return flow.per_sample_pseudo_huber(prediction, target)
    return flow.per_sample_squared_error(prediction, target, self.loss_reduction)

  def forward(self, data, noise=None, times=None, **model_kwargs):
    """The training loss: the batch mean of ``per_sample_loss``."""
    return self.per_sample_loss(data, noise=noise, times=times, **model_kwargs).mean()

  def _device(self):
    param = next(self.model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')

  @torch.no_grad()
  def sample(self, batch_size=1, steps=16, noise=None, data_shape=None, solver='euler', reverse=False, rtol=1e-5,
             atol=1e-5, **model_kwargs):
    """Integrates the flow from noise (t = 0) to data (t = 1), or from data to noise with ``reverse=True``.

    ``noise`` is the starting point (data when reversing). ``steps`` is the number of solver steps of 'euler',
    'midpoint' or 'heun' (``steps=1`` with Euler is exactly one network evaluation, x1 = x0 + v(x0, 0)); 'rk45'
    is adaptive and uses ``rtol``/``atol``. The NFE of the call is stored in ``self.last_sample_nfe``.
    """
    if noise is None:
      shape = data_shape or self.data_shape
      if shape is None:
        raise ValueError('The data shape is unknown: call the flow on a data batch first, or pass data_shape= '
                         'or noise=')
      noise = self.sample_noise((batch_size, *shape), device=self._device())
    t0, t1 = (1.0, 0.0) if reverse else (0.0, 1.0)
    x, nfe = solvers.solve(solver, lambda x, t: self.velocity(x, t, **model_kwargs), noise, t0=t0, t1=t1,
                           steps=steps, rtol=rtol, atol=atol)
    self.last_sample_nfe = nfe
    return x

  def encode(self, data, **sample_kwargs):
    """Data -> noise by integrating the flow backwards (inversion)."""
    return self.sample(noise=data, reverse=True, **sample_kwargs)

  def decode(self, noise, **sample_kwargs):
    """Noise -> data; ``decode(encode(x))`` returns x up to the solver's error."""
    return self.sample(noise=noise, **sample_kwargs)


class Reflow(nn.Module):
  """Reflow (Liu et al. 2022, Sec. 2.3): train a rectified flow on pairs (X0, X1 = ODE(X0)) of a frozen teacher.

  ``Reflow(rectified_flow)`` freezes a copy of ``rectified_flow`` as the teacher and keeps training
  ``rectified_flow`` itself (the student starts from the teacher's weights). ``reflow()`` draws
  ``batch_size`` noises, lets the teacher generate their end points, and returns the student's loss on those
  pairs. ``Reflow(reflow.model)`` reflows again.

  Args:
    rectified_flow: the ``RectifiedFlow`` to reflow (it must know its data shape: call it on data once).
    frozen_model: the teacher; a frozen deep copy of ``rectified_flow`` when None.
    batch_size: pairs per ``reflow()`` call.
    teacher_solver, teacher_steps: how the teacher integrates (published online reflow: 20 Euler steps).
  """

  def __init__(self, rectified_flow, frozen_model=None, *, batch_size=16, teacher_solver='euler', teacher_steps=20):
    super().__init__()
    self.model = rectified_flow
    if frozen_model is None:
      frozen_model = copy.deepcopy(rectified_flow)
    frozen_model.requires_grad_(False)
    frozen_model.eval()
    self.frozen_model = frozen_model
    self.batch_size = batch_size
    self.teacher_solver = teacher_solver
    self.teacher_steps = teacher_steps

  @torch.no_grad()
  def generate_pairs(self, batch_size=None, noise=None, **model_kwargs):
    """(X0, X1) with X1 the teacher's ODE solution from X0."""
    if noise is None:
      shape = self.frozen_model.data_shape or self.model.data_shape
      if shape is None:
        raise ValueError('The data shape is unknown: call the rectified flow on a data batch before Reflow, or '
                         'pass noise=')
      noise = self.frozen_model.sample_noise((batch_size or self.batch_size, *shape),
                                             device=self.frozen_model._device())
    x1 = self.frozen_model.sample(noise=noise, solver=self.teacher_solver, steps=self.teacher_steps, **model_kwargs)
    return noise, x1

  def forward(self, batch_size=None, noise=None, **model_kwargs):
    """The student's loss on a fresh batch of teacher pairs."""
    x0, x1 = self.generate_pairs(batch_size, noise, **model_kwargs)
    return self.model(x1, noise=x0, **model_kwargs)

  def sample(self, *args, **kwargs):
    return self.model.sample(*args, **kwargs)
