"""``RectifiedFlow`` and ``Reflow``: wrap any network, get the training loss, a sampler and reflow."""
import copy

import torch
from torch import nn

from rectified_flow_pytorch import flow_math, solvers

LOSSES = ('mse', 'pseudo_huber', 'lpips_huber')


class FlowFromNoise(nn.Module):
  """What every flow of this library shares: ``model``, the Gaussian source X0 ~ N(0, noise_std^2 I) at t = 0, class
  labels (``num_classes``, the null label ``num_classes``, ``label_dropout``), the data shape seen in training and
  the starting noise of a sample. ``RectifiedFlow`` and ``MeanFlow`` build on it."""

  def __init__(self, model, *, noise_std=1.0, num_classes=0, label_cond_kwarg='labels', label_dropout=0.0):
    super().__init__()
    if not isinstance(num_classes, int) or num_classes < 0:
      raise ValueError(f'num_classes must be 0 (unconditional) or a positive number of classes, got {num_classes!r}')
    if not 0.0 <= label_dropout < 1.0:
      raise ValueError(f'label_dropout must be in [0, 1), got {label_dropout}')
    if label_dropout and not num_classes:
      raise ValueError(f'label_dropout={label_dropout} needs a class-conditional flow: pass num_classes=')
    self.model = model
    self.noise_std = noise_std
    self.num_classes = num_classes
    self.label_cond_kwarg = label_cond_kwarg
    self.label_dropout = label_dropout
    self.data_shape = None
    self.last_sample_nfe = None

  def model_labels(self, labels, batch_size, device):
    """The (B,) labels the model receives: ``labels``, or all null labels where None; None when unconditional."""
    if not self.num_classes:
      if labels is not None:
        raise ValueError(f'labels= needs a class-conditional flow: {type(self).__name__}(model, num_classes=...)')
      return None
    if labels is None:
      return flow_math.null_labels(batch_size, self.num_classes, device)
    flow_math.check_labels(labels, self.num_classes, batch_size)
    if labels.device.type == 'cpu' and labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= (
        self.num_classes):  # Checked where it costs no device synchronisation.
      raise ValueError(f'labels must lie in [0, {self.num_classes}] ({self.num_classes} = no label), got '
                       f'[{int(labels.min())}, {int(labels.max())}]')
    return labels.to(device=device, dtype=torch.long)

  def sample_noise(self, shape, device=None, dtype=torch.float32, generator=None):
    return torch.randn(shape, device=device, dtype=dtype, generator=generator) * self.noise_std

  def training_labels(self, labels, batch_size, device, label_drops=None):
    """``labels`` after label dropout: rows where ``label_drops`` (B,) is True become the null label; when it is
    None, drops are drawn with probability ``label_dropout`` in training mode (``self.training``) only."""
    if labels is None or not self.num_classes:
      return labels
    if label_drops is None:
      if not (self.training and self.label_dropout):
        return labels
      label_drops = flow_math.draw_label_drops(batch_size, self.label_dropout, device=labels.device)
    return flow_math.drop_labels(labels, label_drops, self.num_classes)

  def _device(self):
    param = next(self.model.parameters(), None)
    return param.device if param is not None else torch.device('cpu')

  def starting_noise(self, batch_size, noise=None, data_shape=None, labels=None):
    """The start of a sample: ``noise`` if given, else N(0, noise_std^2 I) of ``batch_size`` (the number of
    ``labels`` when they are given) times ``data_shape`` (default: the data shape seen in training)."""
    if noise is not None:
      return noise
    if labels is not None:
      if batch_size not in (1, len(labels)):
        raise ValueError(f'batch_size={batch_size} but {len(labels)} labels were given: pass one label per sample')
      batch_size = len(labels)
    shape = data_shape or self.data_shape
    if shape is None:
      raise ValueError('The data shape is unknown: call the flow on a data batch first, or pass data_shape= or noise=')
    return self.sample_noise((batch_size, *shape), device=self._device())


class RectifiedFlow(FlowFromNoise):
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
    num_classes: 0 (unconditional, published) or the number of classes of a class-conditional model; the model
      then receives (B,) labels in [0, num_classes] under ``label_cond_kwarg``, where the label ``num_classes``
      means "no label" (its embedding table needs num_classes + 1 rows).
    label_dropout: the probability that training replaces a label by the null label (e.g. 0.1), so that the
      model also learns the unconditional velocity that classifier-free guidance needs (``sample(guidance_scale=)``).
  """

  def __init__(self, model, *, time_cond_kwarg='times', predict='flow', time_distribution='uniform',
               time_distribution_kwargs=None, time_eps=1e-3, loss='mse', perceptual_loss=None,
               loss_reduction='mean', noise_std=1.0, num_classes=0, label_cond_kwarg='labels', label_dropout=0.0):
    super().__init__(model, noise_std=noise_std, num_classes=num_classes, label_cond_kwarg=label_cond_kwarg,
                     label_dropout=label_dropout)
    if predict not in flow_math.PREDICTIONS:
      raise ValueError(f'Unknown predict={predict!r}; valid: {list(flow_math.PREDICTIONS)}')
    if time_distribution not in flow_math.TIME_DISTRIBUTIONS:
      raise ValueError(f'Unknown time_distribution={time_distribution!r}; '
                       f'valid: {sorted(flow_math.TIME_DISTRIBUTIONS)}')
    if loss not in LOSSES:
      raise ValueError(f'Unknown loss={loss!r}; valid: {list(LOSSES)}')
    if loss == 'lpips_huber' and perceptual_loss is None:
      raise ValueError("loss='lpips_huber' needs perceptual_loss=, e.g. lpips.LPIPS(net='vgg')")
    if not 0.0 <= time_eps < 1.0:
      raise ValueError(f'time_eps must be in [0, 1), got {time_eps}')
    self.time_cond_kwarg = time_cond_kwarg
    self.predict = predict
    self.time_distribution = time_distribution
    self.time_distribution_kwargs = dict(time_distribution_kwargs or {})
    self.time_eps = time_eps
    self.loss_name = loss
    self.perceptual_loss = perceptual_loss
    self.loss_reduction = loss_reduction

  def predict_raw(self, x, times, labels=None, **model_kwargs):
    """The model's output at (x, t) for a (B, ...) batch and (B,) times in [0, 1] (and (B,) labels)."""
    labels = self.model_labels(labels, x.shape[0], x.device)
    if labels is not None:
      model_kwargs = {**model_kwargs, self.label_cond_kwarg: labels}
    if self.time_cond_kwarg is None:
      return self.model(x, **model_kwargs)
    return self.model(x, **{self.time_cond_kwarg: times}, **model_kwargs)

  def is_guided(self, labels, guidance_scale, guidance_interval=None):
    """Whether a velocity call with these labels, guidance scale and interval evaluates the network twice per
    sample."""
    if guidance_scale == 1.0:
      return False
    if not self.num_classes:
      raise ValueError(f'guidance_scale={guidance_scale} needs a class-conditional flow: RectifiedFlow(model, '
                       f'num_classes=...); guidance_scale=1 samples without guidance')
    if guidance_scale == 0.0 and guidance_interval is None:  # The unconditional velocity alone.
      return False
    if labels is None:
      raise ValueError(f'guidance_scale={guidance_scale} guides towards labels: pass labels= (one per sample)')
    return True

  def velocity(self, x, times, labels=None, guidance_scale=1.0, guidance_interval=None, **model_kwargs):
    """v(x, t), converted from the model's prediction where it predicts noise or data.

    With labels and ``guidance_scale`` w not 1: v_null + w (v_cond - v_null) (``flow_math.guided_velocity``), the two
    velocities from one network call on the batch doubled ([x, x] with [labels, null labels]); w = 0 is one call
    with null labels. ``guidance_interval`` (t_min, t_max) guides only the samples whose t lies in it and gives the
    others their conditional velocity (``flow_math.guided_velocity``); the call is doubled all the same.
    """
    flow_math.check_guidance_interval(guidance_interval)
    if not self.is_guided(labels, guidance_scale, guidance_interval):
      if guidance_scale == 0.0:
        labels = None
      return flow_math.to_velocity(self.predict, self.predict_raw(x, times, labels, **model_kwargs), x, times)
    batch = x.shape[0]
    labels = self.model_labels(labels, batch, x.device)
    both_labels = torch.cat([labels, flow_math.null_labels(batch, self.num_classes, x.device)])
    both_x, both_times = torch.cat([x, x]), torch.cat([times, times])
    doubled = {key: torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.dim() and
               value.shape[0] == batch else value for key, value in model_kwargs.items()}
    both = flow_math.to_velocity(self.predict, self.predict_raw(both_x, both_times, both_labels, **doubled), both_x,
                            both_times)
    conditional, unconditional = both.chunk(2)
    return flow_math.guided_velocity(conditional, unconditional, guidance_scale, times, guidance_interval)

  def sample_times(self, batch_size, device=None, dtype=torch.float32, generator=None):
    return flow_math.sample_times(batch_size, self.time_distribution, eps=self.time_eps, device=device, dtype=dtype,
                             generator=generator, **self.time_distribution_kwargs)

  def predict_on_path(self, data, noise=None, times=None, labels=None, label_drops=None, **model_kwargs):
    """Draws (X0, t) where not given and returns (noise, times, X_t, the model's prediction at (X_t, t)).

    ``labels`` (B,) condition a class-conditional model, after label dropout (``training_labels``).
    """
    if self.data_shape is None:
      self.data_shape = tuple(data.shape[1:])
    if noise is None:
      noise = self.sample_noise(data.shape, device=data.device, dtype=data.dtype)
    if times is None:
      times = self.sample_times(data.shape[0], device=data.device, dtype=data.dtype)
    x_t = flow_math.interpolate(noise, data, times)
    labels = self.training_labels(labels, data.shape[0], data.device, label_drops)
    return noise, times, x_t, self.predict_raw(x_t, times, labels, **model_kwargs)

  def per_sample_loss(self, data, noise=None, times=None, labels=None, label_drops=None, **model_kwargs):
    """The loss of each sample, (B,)."""
    noise, times, x_t, prediction = self.predict_on_path(data, noise, times, labels, label_drops, **model_kwargs)
    if self.loss_name == 'lpips_huber':
      clean = flow_math.to_clean(self.predict, prediction, x_t, times)
      weight = 1.0 / (1.0 - times).clamp(min=1e-3)
      return weight * (flow_math.per_sample_pseudo_huber(clean, data) + self.perceptual_loss(clean, data).reshape(-1))
    target = flow_math.prediction_target(self.predict, noise, data)
    if self.loss_name == 'pseudo_huber':
      return flow_math.per_sample_pseudo_huber(prediction, target)
    return flow_math.per_sample_squared_error(prediction, target, self.loss_reduction)

  def forward(self, data, noise=None, times=None, labels=None, label_drops=None, **model_kwargs):
    """The training loss: the batch mean of ``per_sample_loss`` (``labels`` (B,) for a class-conditional flow)."""
    return self.per_sample_loss(data, noise=noise, times=times, labels=labels, label_drops=label_drops,
                                **model_kwargs).mean()

  @torch.no_grad()
  def sample(self, batch_size=1, steps=16, noise=None, data_shape=None, solver='euler', reverse=False, rtol=1e-5,
             atol=1e-5, labels=None, guidance_scale=1.0, guidance_interval=None, **model_kwargs):
    """Integrates the flow from noise (t = 0) to data (t = 1), or from data to noise with ``reverse=True``.

    ``noise`` is the starting point (data when reversing). ``steps`` is the number of solver steps of 'euler',
    'midpoint' or 'heun' (``steps=1`` with Euler is exactly one network evaluation, x1 = x0 + v(x0, 0)); 'rk45'
    is adaptive and uses ``rtol``/``atol``. A class-conditional flow takes (B,) ``labels`` (one per sample; the
    batch size follows them; None samples without labels), a ``guidance_scale`` w and a ``guidance_interval`` of
    the times it guides (``velocity``; None: all). The number of network evaluations per sample is stored in
    ``self.last_sample_nfe`` (twice the solver's calls when guided).
    """
    noise = self.starting_noise(batch_size, noise, data_shape, labels)
    evaluations_per_call = 2 if self.is_guided(labels, guidance_scale, guidance_interval) else 1
    labels = None if labels is None else self.model_labels(labels, noise.shape[0], noise.device)
    t0, t1 = (1.0, 0.0) if reverse else (0.0, 1.0)
    x, nfe = solvers.solve(
        solver, lambda x, t: self.velocity(x, t, labels=labels, guidance_scale=guidance_scale,
                                           guidance_interval=guidance_interval, **model_kwargs),
        noise, t0=t0, t1=t1, steps=steps, rtol=rtol, atol=atol)
    self.last_sample_nfe = nfe * evaluations_per_call
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
  pairs. ``Reflow(reflow.model)`` reflows again. A class-conditional teacher generates each pair for a label
  (uniform over the classes unless given), guided with ``teacher_guidance_scale``, and the student learns the
  pair with that label, so that it reproduces the guided flow without guidance (sample it with guidance_scale=1).

  Args:
    rectified_flow: the ``RectifiedFlow`` to reflow (it must know its data shape: call it on data once).
    frozen_model: the teacher; a frozen deep copy of ``rectified_flow`` when None.
    batch_size: pairs per ``reflow()`` call.
    teacher_solver, teacher_steps: how the teacher integrates (published online reflow: 20 Euler steps).
    teacher_guidance_scale: classifier-free guidance of a class-conditional teacher (1: none).
    teacher_guidance_interval: the (t_min, t_max) in which the teacher is guided (None: all of [0, 1]).
  """

  def __init__(self, rectified_flow, frozen_model=None, *, batch_size=16, teacher_solver='euler', teacher_steps=20,
               teacher_guidance_scale=1.0, teacher_guidance_interval=None):
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
    self.teacher_guidance_scale = teacher_guidance_scale
    flow_math.check_guidance_interval(teacher_guidance_interval)
    self.teacher_guidance_interval = teacher_guidance_interval
    if frozen_model.num_classes != rectified_flow.num_classes:
      raise ValueError(f'The teacher has num_classes={frozen_model.num_classes}, the student '
                       f'{rectified_flow.num_classes}: a student learns the labels of its teacher')
    if teacher_guidance_scale != 1.0 and not frozen_model.num_classes:
      raise ValueError(f'teacher_guidance_scale={teacher_guidance_scale} needs a class-conditional teacher: '
                       f'RectifiedFlow(model, num_classes=...)')

  @property
  def conditional(self):
    return self.frozen_model.num_classes > 0

  @torch.no_grad()
  def generate_pairs(self, batch_size=None, noise=None, labels=None, **model_kwargs):
    """(X0, X1) with X1 the teacher's ODE solution from X0; (X0, X1, labels) for a class-conditional teacher."""
    teacher = self.frozen_model
    if labels is not None and not self.conditional:
      raise ValueError('labels= needs a class-conditional teacher: RectifiedFlow(model, num_classes=...)')
    if labels is not None and batch_size is not None and batch_size != len(labels):
      raise ValueError(f'batch_size={batch_size} but {len(labels)} labels: give one label per sample')
    if noise is None:
      shape = teacher.data_shape or self.model.data_shape
      if shape is None:
        raise ValueError('The data shape is unknown: call the rectified flow on a data batch before Reflow, or '
                         'pass noise=')
      size = len(labels) if labels is not None else batch_size or self.batch_size
      noise = teacher.sample_noise((size, *shape), device=teacher._device())
    if self.conditional and labels is None:
      labels = torch.randint(teacher.num_classes, (noise.shape[0],), device=noise.device)
    guidance = ({'labels': labels, 'guidance_scale': self.teacher_guidance_scale,
                 'guidance_interval': self.teacher_guidance_interval} if self.conditional else {})
    x1 = teacher.sample(noise=noise, solver=self.teacher_solver, steps=self.teacher_steps, **guidance, **model_kwargs)
    return (noise, x1, labels) if self.conditional else (noise, x1)

  def forward(self, batch_size=None, noise=None, labels=None, **model_kwargs):
    """The student's loss on a fresh batch of teacher pairs (with their labels when class-conditional)."""
    x0, x1, *pair_labels = self.generate_pairs(batch_size, noise, labels, **model_kwargs)
    return self.model(x1, noise=x0, labels=pair_labels[0] if pair_labels else None, **model_kwargs)

  def sample(self, *args, **kwargs):
    return self.model.sample(*args, **kwargs)
