"""``MeanFlow``: a network of the average velocity over a time interval, trained from scratch, sampled in 1 or a few
steps (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling")."""
import torch
from torch.autograd import forward_ad

from rectified_flow_pytorch import flow_math
from rectified_flow_pytorch.rectified_flow import FlowFromNoise

LOSS_REDUCTIONS = ('sum', 'mean')
SPLIT_POINTS = ('uniform', 'midpoint')


class MeanFlow(FlowFromNoise):
  """A MeanFlow from Gaussian noise (t = 0) to data (t = 1) around ``model``, which predicts average velocities.

  Along the flow dz/dt = v(z, t) of the rectified-flow interpolation X_t = (1 - t) X0 + t X1 (velocity X1 - X0), the
  average velocity from a time t to a later time s >= t is
      u(z_t, t, s) = 1 / (s - t) * integral_t^s v(z_tau, tau) dtau,   so that   z_s = z_t + (s - t) u(z_t, t, s)
  exactly, and u(z, t, t) = v(z, t). Differentiating (s - t) u(z_t, t, s) = integral_t^s v dtau in t along the
  trajectory (s fixed) gives -u + (s - t) du/dt = -v, the MeanFlow identity in this library's convention:
      u(z_t, t, s) = v(z_t, t) + (s - t) d/dt u(z_t, t, s),   d/dt u = (du/dz) v + du/dt (partial),
  the total derivative being the Jacobian-vector product of (z, t, s) -> u with the tangent (v, 1, 0). Training
  regresses u_theta(z_t, t, s) on the target sg(v + (s - t) d/dt u_theta) with v the conditional velocity X1 - X0
  (Geng et al. 2025, Sec. 4.1; one forward-mode pass); with s = t the target is v, that of a rectified flow.
  Sampling takes k steps z_{i+1} = z_i + (t_{i+1} - t_i) u(z_i, t_i, t_{i+1}) on the uniform grid
  0 = t_0 < ... < t_k = 1, one network evaluation each.

  The paper runs time the other way (t = 0 data, t = 1 noise, r <= t, z_r = z_t - (t - r) u(z_t, r, t)). With
  tau' = 1 - tau: its t is 1 - (our start t), its r is 1 - (our end s), its velocities are ours negated, its identity
  u = v - (t - r) d/dt u becomes the one above, and its logit-normal lognorm(m, std) is lognorm(-m, std) here.

  Args:
    model: any ``nn.Module`` mapping (x, start time, end time) to a tensor shaped like x, the average velocity;
      called as ``model(x, times=t, end_times=s)`` (plus ``labels=`` when class-conditional) with (B,) times in
      [0, 1], s >= t. How it embeds them is its own business (the paper embeds (t, t - r), here (t, s - t)).
    time_cond_kwarg, end_time_cond_kwarg: the keywords of the start and end times (None: not passed).
    time_distribution: the distribution of each of the two times drawn per sample (``flow_math.sample_times``):
      'logit_normal' (the paper's) or any other of ``flow_math.TIME_DISTRIBUTIONS``; ``time_distribution_kwargs``
      go to it. Default for 'logit_normal': {'mean': 0.4, 'std': 1.0}, the paper's best ImageNet sampler
      lognorm(-0.4, 1.0) in this convention (its CIFAR-10 one, lognorm(-2.0, 2.0), is {'mean': 2.0, 'std': 2.0}).
    end_time_distribution_kwargs: None (default): both draws of a pair come from ``time_distribution_kwargs``. Given
      (e.g. {'mean': 4.0, 'std': 1.6}), the second draw comes from ``time_distribution`` with these instead: a
      sampler of two distributions, one for the start and one (nearer the data) for the end of the interval; the
      earlier draw is still t and the later s.
    uniform_pair_fraction: the probability that a sample's two draws are uniform on [0, 1] instead (0, the default:
      never): a mixture that keeps a logit-normal sampler's weight where it puts it and trains every interval, e.g.
      the first jump of two steps, which the two-distribution sampler above almost never draws.
    interval_fraction: the probability that a sample's pair is an interval t < s: the earlier of the two draws is
      t and the later s; the other samples get s = t = the earlier draw, as rectified-flow samples. The paper's
      "ratio of r != t": 0.25 (ImageNet, best), 0.75 (CIFAR-10); 0 trains a plain rectified flow.
    adaptive_weight_power, adaptive_weight_constant: p and c of the per-sample weight sg(1 / (||delta||^2 + c)^p)
      of the squared error ||delta||^2 (Geng et al. 2025, Sec. 4.3; p = 1 their best on ImageNet, 0.75 on
      CIFAR-10; p = 0 no weighting).
    loss_reduction: ||delta||^2 is the 'sum' of squares over the data dimensions (the paper's squared L2 norm)
      or their 'mean' (RectifiedFlow's 'mse').
    noise_std: standard deviation of the Gaussian source X0 ~ N(0, noise_std^2 I).
    num_classes, label_cond_kwarg, label_dropout: class conditioning as in ``RectifiedFlow``: (B,) labels in
      [0, num_classes], ``num_classes`` being "no label", dropped to it at random with ``label_dropout``.
    guidance_scale, guidance_mix, guidance_interval: classifier-free guidance trained into the network (Geng et
      al. 2025, Sec. 4.2 and App. B.1), so that sampling stays one evaluation per step: for a sample with a label
      and a start time t in ``guidance_interval`` (t_min, t_max) (None: all), the velocity v of the identity (target
      and tangent) becomes
          v~ = w v + kappa u_theta(z_t, t, t | c) + (1 - w - kappa) u_theta(z_t, t, t | null)
      (w = ``guidance_scale``, kappa = ``guidance_mix``; both u_theta without gradient); samples without a label
      keep v, so that the network also learns the unconditional field. w = 1, kappa = 0 is no guidance. Needs
      ``label_dropout`` > 0.
  """

  target_kwargs = ()  # The keywords of ``per_sample_loss`` that go to the target, not to the network.

  def __init__(self, model, *, time_cond_kwarg='times', end_time_cond_kwarg='end_times',
               time_distribution='logit_normal', time_distribution_kwargs=None, interval_fraction=0.25,
               end_time_distribution_kwargs=None, uniform_pair_fraction=0.0,
               adaptive_weight_power=1.0, adaptive_weight_constant=1e-3, loss_reduction='sum', noise_std=1.0,
               num_classes=0, label_cond_kwarg='labels', label_dropout=0.0, guidance_scale=1.0, guidance_mix=0.0,
               guidance_interval=None):
    super().__init__(model, noise_std=noise_std, num_classes=num_classes, label_cond_kwarg=label_cond_kwarg,
                     label_dropout=label_dropout)
    if time_distribution not in flow_math.TIME_DISTRIBUTIONS:
      raise ValueError(f'Unknown time_distribution={time_distribution!r}; '
                       f'valid: {sorted(flow_math.TIME_DISTRIBUTIONS)}')
    if not 0.0 <= interval_fraction <= 1.0:
      raise ValueError(f'interval_fraction must be in [0, 1], got {interval_fraction}')
    if not 0.0 <= uniform_pair_fraction <= 1.0:
      raise ValueError(f'uniform_pair_fraction must be in [0, 1], got {uniform_pair_fraction}')
    if adaptive_weight_power < 0.0 or adaptive_weight_constant <= 0.0:
      raise ValueError(f'The adaptive weight needs power >= 0 and constant > 0, got {adaptive_weight_power} and '
                       f'{adaptive_weight_constant}')
    if loss_reduction not in LOSS_REDUCTIONS:
      raise ValueError(f'Unknown loss_reduction={loss_reduction!r}; valid: {list(LOSS_REDUCTIONS)}')
    flow_math.check_guidance_interval(guidance_interval)
    if (guidance_scale != 1.0 or guidance_mix != 0.0) and not (num_classes and label_dropout):
      raise ValueError(f'guidance_scale={guidance_scale}, guidance_mix={guidance_mix} train classifier-free '
                       f'guidance into the network: it needs num_classes= and label_dropout > 0 (e.g. 0.1), so that '
                       f'the network also learns the unconditional velocity')
    if time_distribution_kwargs is None:
      time_distribution_kwargs = {'mean': 0.4, 'std': 1.0} if time_distribution == 'logit_normal' else {}
    self.time_cond_kwarg = time_cond_kwarg
    self.end_time_cond_kwarg = end_time_cond_kwarg
    self.time_distribution = time_distribution
    self.time_distribution_kwargs = dict(time_distribution_kwargs)
    self.end_time_distribution_kwargs = dict(self.time_distribution_kwargs if end_time_distribution_kwargs is None
                                             else end_time_distribution_kwargs)
    self.interval_fraction = interval_fraction
    self.uniform_pair_fraction = uniform_pair_fraction
    self.adaptive_weight_power = adaptive_weight_power
    self.adaptive_weight_constant = adaptive_weight_constant
    self.loss_reduction = loss_reduction
    self.guidance_scale = guidance_scale
    self.guidance_mix = guidance_mix
    self.guidance_interval = guidance_interval

  @property
  def guided(self):
    return self.guidance_scale != 1.0 or self.guidance_mix != 0.0

  def _call_model(self, x, times, end_times, model_labels, model_kwargs):
    """The network at (x, t, s) with labels already resolved by ``model_labels`` (or None)."""
    if model_labels is not None:
      model_kwargs = {**model_kwargs, self.label_cond_kwarg: model_labels}
    if self.time_cond_kwarg is not None:
      model_kwargs = {**model_kwargs, self.time_cond_kwarg: times}
    if self.end_time_cond_kwarg is not None:
      model_kwargs = {**model_kwargs, self.end_time_cond_kwarg: end_times}
    return self.model(x, **model_kwargs)

  def average_velocity(self, x, times, end_times, labels=None, **model_kwargs):
    """u_theta(x, t, s) for a (B, ...) batch, (B,) start and end times (and (B,) labels)."""
    return self._call_model(x, times, end_times, self.model_labels(labels, x.shape[0], x.device), model_kwargs)

  def velocity(self, x, times, labels=None, **model_kwargs):
    """The instantaneous velocity v(x, t) = u_theta(x, t, t), for an ODE solver (``solvers.solve``)."""
    return self.average_velocity(x, times, times, labels, **model_kwargs)

  def sample_time_pairs(self, batch_size, device=None, dtype=torch.float32, generator=None):
    """(B,) start and end times t <= s: two draws of ``time_distribution`` (the second with
    ``end_time_distribution_kwargs``), or with probability ``uniform_pair_fraction`` two uniform draws, t the
    earlier and s the later, and s = t for each sample with probability 1 - ``interval_fraction`` (Geng et al.
    2025, Sec. 4.3). Without the uniform part the random stream is the sampler's alone."""
    draws = [flow_math.sample_times(batch_size, self.time_distribution, eps=0.0, device=device, dtype=dtype,
                                    generator=generator, **kwargs)
             for kwargs in (self.time_distribution_kwargs, self.end_time_distribution_kwargs)]
    if self.uniform_pair_fraction:
      uniform = torch.rand(batch_size, device=device, generator=generator) < self.uniform_pair_fraction
      draws = [torch.where(uniform, flow_math.sample_times(batch_size, 'uniform', eps=0.0, device=device, dtype=dtype,
                                                           generator=generator), draw) for draw in draws]
    times, end_times = torch.minimum(*draws), torch.maximum(*draws)
    intervals = torch.rand(batch_size, device=device, generator=generator) < self.interval_fraction
    return times, torch.where(intervals, end_times, times)

  def sample_training_times(self, batch_size, device=None, dtype=torch.float32, generator=None):
    """The keyword arguments of ``per_sample_loss`` that a training sample draws besides its noise, for a batch:
    {'times': t, 'end_times': s} (``sample_time_pairs``)."""
    times, end_times = self.sample_time_pairs(batch_size, device=device, dtype=dtype, generator=generator)
    return {'times': times, 'end_times': end_times}

  @torch.no_grad()
  def guided_velocity(self, x_t, times, velocity, model_labels, **model_kwargs):
    """The velocity v~ that replaces v in the identity under trained-in guidance (see the class docstring): v for
    the samples with the null label or a start time outside ``guidance_interval``; no gradient."""
    if not self.guided or model_labels is None:
      return velocity
    batch, ndim = x_t.shape[0], x_t.dim()
    null = flow_math.null_labels(batch, self.num_classes, x_t.device)
    if self.guidance_mix:  # One call on the doubled batch: [conditional, unconditional].
      doubled = {key: torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.dim() and
                 value.shape[0] == batch else value for key, value in model_kwargs.items()}
      both_times = torch.cat([times, times])
      conditional, unconditional = self._call_model(torch.cat([x_t, x_t]), both_times, both_times,
                                                    torch.cat([model_labels, null]), doubled).chunk(2)
    else:
      conditional, unconditional = 0.0, self._call_model(x_t, times, times, null, model_kwargs)
    guided = (self.guidance_scale * velocity + self.guidance_mix * conditional +
              (1.0 - self.guidance_scale - self.guidance_mix) * unconditional)
    keep = model_labels != self.num_classes
    if self.guidance_interval is not None:
      keep = keep & flow_math.in_guidance_interval(times, self.guidance_interval)
    return torch.where(flow_math.append_dims(keep, ndim), guided, velocity)

  def average_velocity_and_target(self, x_t, times, end_times, velocity, labels=None, **model_kwargs):
    """(u_theta(x_t, t, s), sg(v + (s - t) d/dt u_theta(x_t, t, s))) for a (B, ...) batch on the path, (B,) times
    t <= s and the velocity v (B, ...) that moves x_t (the tangent's z part); d/dt u_theta by one forward-mode
    pass along (v, 1, 0) (``torch.autograd.forward_ad``). The first carries the gradient, the target none."""
    model_labels = self.model_labels(labels, x_t.shape[0], x_t.device)
    velocity = velocity.detach()
    prediction, total_derivative = self._prediction_and_total_derivative(x_t, times, end_times, velocity,
                                                                          model_labels, model_kwargs)
    interval = flow_math.append_dims(end_times - times, x_t.dim()).to(x_t.dtype)
    return prediction, (velocity + interval * total_derivative).detach()

  def _prediction_and_total_derivative(self, x_t, times, end_times, tangent, model_labels, model_kwargs):
    """(u_theta(x_t, t, s), d/dt u_theta along (``tangent``, 1, 0)) by one forward-mode pass; the first carries
    the gradient."""
    # Dual numbers (torch.autograd.forward_ad) rather than torch.func.jvp: the model is called as itself, so that a
    # DistributedDataParallel wrapper runs its own forward (bucket rebuilds, gradient hooks) outside any functorch
    # transform. The end time s has tangent 0: it enters as a plain tensor.
    with forward_ad.dual_level():
      output = self._call_model(forward_ad.make_dual(x_t, tangent),
                                forward_ad.make_dual(times, torch.ones_like(times)), end_times, model_labels,
                                model_kwargs)
      prediction, total_derivative = forward_ad.unpack_dual(output)
    if total_derivative is None:  # The output does not depend on z or t.
      total_derivative = torch.zeros_like(prediction)
    return prediction, total_derivative

  @torch.no_grad()
  def target_terms(self, x_t, times, end_times, velocity, labels=None, **model_kwargs):
    """The parts of MeanFlow's target v + (s - t) d/dt u_theta for a (B, ...) batch, each (B, ...): {'velocity': v,
    'spatial': (s - t) (du/dz) v, the network's change along the flow through its input image, 'temporal':
    (s - t) du/dt (partial), its change through its time input, and 'prediction': u_theta(x_t, t, s)}; velocity +
    spatial + temporal is the target (two forward-mode passes, along (v, 0, 0) and (0, 1, 0)). What dominates the
    target shows which input the identity trains the network through."""
    model_labels = self.model_labels(labels, x_t.shape[0], x_t.device)
    interval = flow_math.append_dims(end_times - times, x_t.dim()).to(x_t.dtype)
    terms = {'velocity': velocity}
    for name, (x_tangent, t_tangent) in {'spatial': (velocity, torch.zeros_like(times)),
                                         'temporal': (torch.zeros_like(x_t), torch.ones_like(times))}.items():
      with forward_ad.dual_level():
        output = self._call_model(forward_ad.make_dual(x_t, x_tangent), forward_ad.make_dual(times, t_tangent),
                                  end_times, model_labels, model_kwargs)
        prediction, derivative = forward_ad.unpack_dual(output)
      terms[name] = interval * (torch.zeros_like(prediction) if derivative is None else derivative)
    terms['prediction'] = prediction
    return terms

  def per_sample_loss(self, data, noise=None, times=None, end_times=None, labels=None, label_drops=None,
                      **model_kwargs):
    """The loss of each sample, (B,): sg(w) ||u_theta(X_t, t, s) - sg(u_tgt)||^2 with the adaptive weight w.

    X0, (t, s) are drawn where not given (``times`` and ``end_times`` come together). ``labels`` (B,) condition a
    class-conditional model, after label dropout (``training_labels``). The keywords named by ``target_kwargs``
    (``SplitMeanFlow``'s ``split_fractions``) go to the target; the other ``model_kwargs`` to the network.
    """
    if (times is None) != (end_times is None):
      raise ValueError('Pass both times= and end_times= (start and end of each interval, s = t for none), or neither')
    if self.data_shape is None:
      self.data_shape = tuple(data.shape[1:])
    if noise is None:
      noise = self.sample_noise(data.shape, device=data.device, dtype=data.dtype)
    if times is None:
      times, end_times = self.sample_time_pairs(data.shape[0], device=data.device, dtype=data.dtype)
    target_kwargs = {key: model_kwargs.pop(key) for key in self.target_kwargs if key in model_kwargs}
    x_t = flow_math.interpolate(noise, data, times)
    labels = self.training_labels(labels, data.shape[0], data.device, label_drops)
    model_labels = self.model_labels(labels, data.shape[0], data.device)
    velocity = self.guided_velocity(x_t, times, flow_math.velocity_target(noise, data), model_labels, **model_kwargs)
    prediction, target = self.average_velocity_and_target(x_t, times, end_times, velocity, labels, **target_kwargs,
                                                          **model_kwargs)
    squared_error = flow_math.per_sample_squared_error(prediction, target, self.loss_reduction)
    if not self.adaptive_weight_power:
      return squared_error
    weight = (squared_error.detach() + self.adaptive_weight_constant) ** -self.adaptive_weight_power
    return weight * squared_error

  def forward(self, data, noise=None, times=None, end_times=None, labels=None, label_drops=None, **model_kwargs):
    """The training loss: the batch mean of ``per_sample_loss`` (``labels`` (B,) for a class-conditional flow)."""
    return self.per_sample_loss(data, noise=noise, times=times, end_times=end_times, labels=labels,
                                label_drops=label_drops, **model_kwargs).mean()

  @torch.no_grad()
  def sample(self, batch_size=1, steps=1, noise=None, data_shape=None, labels=None, **model_kwargs):
    """Maps noise (t = 0) to data (t = 1) in ``steps`` jumps z <- z + (s - t) u_theta(z, t, s) on a uniform grid.

    ``noise`` is the starting point (drawn from N(0, noise_std^2 I) when None). A class-conditional flow takes (B,)
    ``labels`` (one per sample; the batch size follows them; None samples without labels); guidance, if trained
    in, needs no second evaluation. ``self.last_sample_nfe`` becomes the network evaluations per sample, ``steps``.
    """
    if not isinstance(steps, int) or steps < 1:
      raise ValueError(f'steps must be a positive integer, got {steps!r}')
    noise = self.starting_noise(batch_size, noise, data_shape, labels)
    model_labels = self.model_labels(labels, noise.shape[0], noise.device)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=noise.dtype, device=noise.device)
    x = noise
    for start, end in zip(grid[:-1], grid[1:]):
      times, end_times = start.repeat(x.shape[0]), end.repeat(x.shape[0])  # (B,), (B,)
      x = x + (end - start) * self._call_model(x, times, end_times, model_labels, model_kwargs)
    self.last_sample_nfe = steps
    return x


class SplitMeanFlow(MeanFlow):
  """A MeanFlow trained without a Jacobian-vector product: the target of an interval comes from the network's own
  average velocities over two parts of it (SplitMeanFlow, Guo et al. 2025; shortcut models, Frans et al. 2024, are
  the midpoint case).

  The average velocity is additive over intervals: for t <= m <= s on one trajectory,
      (s - t) u(z_t, t, s) = (m - t) u(z_t, t, m) + (s - m) u(z_m, m, s),   z_m = z_t + (m - t) u(z_t, t, m),
  so with m = t + lam (s - t), u(z_t, t, s) = lam u(z_t, t, m) + (1 - lam) u(z_m, m, s). Training regresses
  u_theta(X_t, t, s) on sg(lam u_theta(X_t, t, m) + (1 - lam) u_theta(z_m, m, s)) for the interval samples (s > t)
  and on the conditional velocity X1 - X0 for the others (s = t, the boundary condition u(z, t, t) = v, a
  rectified flow's target): two network evaluations without gradient in place of a forward-mode pass, so any
  network (and any kernel without a forward-mode rule) trains. As lam -> 0 the target tends to MeanFlow's, with the
  network's own velocity u_theta(z_t, t, t) as the tangent: target = u + lam (v_theta + (s - t) d/dt u - u) + O(lam^2).

  Everything else (the time pairs, the adaptive weight, labels, trained-in guidance of the boundary target,
  sampling) is ``MeanFlow``'s, whose arguments it takes, plus:
    split_point: where an interval splits: 'uniform' (lam ~ U(0, 1) per sample, SplitMeanFlow's) or 'midpoint'
      (lam = 1/2, the shortcut models' two half steps).
  except that ``adaptive_weight_power`` defaults to 0, the plain squared error: an interval's target carries no noise
  of the pair, so its error is small beside that of an s = t sample, and a weight 1 / (error + c)^p with p > 0
  weights the intervals up until u = 0 (its own split target) wins over the boundary; on the digits bench p = 0.75
  trained u = 0 (docs/one_step.md).
  """

  target_kwargs = ('split_fractions',)

  def __init__(self, model, *, split_point='uniform', adaptive_weight_power=0.0, **kwargs):
    super().__init__(model, adaptive_weight_power=adaptive_weight_power, **kwargs)
    if split_point not in SPLIT_POINTS:
      raise ValueError(f'Unknown split_point={split_point!r}; valid: {list(SPLIT_POINTS)}')
    self.split_point = split_point

  def sample_split_fractions(self, batch_size, device=None, dtype=torch.float32, generator=None):
    """(B,) fractions lam in [0, 1]: the split point m = t + lam (s - t) of each sample's interval."""
    if self.split_point == 'midpoint':
      return torch.full((batch_size,), 0.5, device=device, dtype=dtype)
    return torch.rand(batch_size, device=device, dtype=dtype, generator=generator)

  def sample_training_times(self, batch_size, device=None, dtype=torch.float32, generator=None):
    """{'times': t, 'end_times': s, 'split_fractions': lam} for a batch (the fractions drawn after the pairs)."""
    times = super().sample_training_times(batch_size, device=device, dtype=dtype, generator=generator)
    times['split_fractions'] = self.sample_split_fractions(batch_size, device=device, dtype=dtype,
                                                           generator=generator)
    return times

  def average_velocity_and_target(self, x_t, times, end_times, velocity, labels=None, split_fractions=None,
                                  **model_kwargs):
    """(u_theta(x_t, t, s), target) for a (B, ...) batch on the path, (B,) times t <= s and the velocity v that
    moves x_t: the target is sg(lam u_theta(x_t, t, m) + (1 - lam) u_theta(z_m, m, s)) where s > t and v where
    s = t (``split_fractions`` lam, (B,), drawn when None). Only the first carries a gradient."""
    model_labels = self.model_labels(labels, x_t.shape[0], x_t.device)
    if split_fractions is None:
      split_fractions = self.sample_split_fractions(x_t.shape[0], device=x_t.device, dtype=x_t.dtype)
    ndim = x_t.dim()
    fractions = flow_math.append_dims(split_fractions, ndim).to(x_t.dtype)
    middle = times + split_fractions.to(times.dtype) * (end_times - times)
    # The two evaluations without gradient come first, so that a DistributedDataParallel wrapper sees one forward
    # with gradient per backward, as for any other loss.
    with torch.no_grad():
      first = self._call_model(x_t, times, middle, model_labels, model_kwargs)
      x_middle = x_t + flow_math.append_dims(middle - times, ndim).to(x_t.dtype) * first
      second = self._call_model(x_middle, middle, end_times, model_labels, model_kwargs)
      split = fractions * first + (1.0 - fractions) * second
      target = torch.where(flow_math.append_dims(end_times > times, ndim), split, velocity.detach())
    prediction = self._call_model(x_t, times, end_times, model_labels, model_kwargs)
    return prediction, target


class ImprovedMeanFlow(MeanFlow):
  """MeanFlow with the network's own velocity as the Jacobian-vector product's tangent (improved MeanFlow, iMF:
  Geng, Lu, Wu, Shechtman, Kolter, He 2025, "Improved Mean Flows: On the Challenges of Fastforward Generative
  Models", arXiv:2512.02012).

  MeanFlow's target v + (s - t) d/dt u_theta differentiates u_theta along the conditional velocity X1 - X0, a draw
  that many trajectories share through the same z_t, so the target itself depends on the network through a noisy
  direction. iMF instead writes the loss as one on the instantaneous velocity: the compound
      V_theta(z_t, t, s) = u_theta(z_t, t, s) - (s - t) sg(d/dt u_theta(z_t, t, s)),   tangent (v_theta, 1, 0),
  with v_theta(z_t, t) = u_theta(z_t, t, t) the network's marginal velocity (no gradient), regresses on the
  conditional velocity X1 - X0 as a rectified flow does: ||V_theta - v||^2. As the derivative carries no gradient,
  this is ||u_theta - sg(v + (s - t) d/dt u_theta)||^2, MeanFlow's form with the other tangent; the adaptive weight,
  time pairs, labels and sampling are ``MeanFlow``'s (whose arguments it takes). One more forward without gradient
  (v_theta) than MeanFlow; s = t gives the rectified flow's target v as before. iMF's guidance as a conditioning
  input and its in-context conditioning are network changes, not this objective's, and are not part of it.
  """

  def average_velocity_and_target(self, x_t, times, end_times, velocity, labels=None, **model_kwargs):
    """(u_theta(x_t, t, s), sg(v + (s - t) d/dt u_theta(x_t, t, s))) with d/dt u_theta along the network's own
    velocity (sg(u_theta(x_t, t, t)), 1, 0); ``MeanFlow.average_velocity_and_target`` otherwise."""
    model_labels = self.model_labels(labels, x_t.shape[0], x_t.device)
    with torch.no_grad():  # Before the pass with gradient, as SplitMeanFlow's (one such forward per backward).
      model_velocity = self._call_model(x_t, times, times, model_labels, model_kwargs)
    prediction, total_derivative = self._prediction_and_total_derivative(x_t, times, end_times,
                                                                          model_velocity.to(x_t.dtype),
                                                                          model_labels, model_kwargs)
    interval = flow_math.append_dims(end_times - times, x_t.dim()).to(x_t.dtype)
    return prediction, (velocity.detach() + interval * total_derivative).detach()
