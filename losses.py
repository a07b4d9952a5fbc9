"""Config -> library adapters: the rectified flow, reflow time schedules and losses, the optimiser, and the one
step function shared by 1-rectified-flow training, reflow and distillation."""
import contextlib
import functools

import torch
import torch.nn.functional as F

import pretrained_weights
from models import ExponentialMovingAverage, VelocityField, create_model, num_classes, time_scales
from rectified_flow_pytorch import ImprovedMeanFlow, MeanFlow, RectifiedFlow, SplitMeanFlow, flow_math
from sampling import checked_interval
from speed.precision import training_autocast

REFLOW_LOSSES = ('l2', 'lpips', 'lpips+l2', 'lpips_huber', 'pseudo_huber')
LPIPS_LOSSES = ('lpips', 'lpips+l2', 'lpips_huber')  # The reflow losses that need the LPIPS network (VGG16 weights).
OBJECTIVES = ('rectified_flow', 'meanflow')
# meanflow.target: MeanFlow's forward-mode identity, SplitMeanFlow's (no forward mode), improved MeanFlow's.
MEANFLOW_TARGETS = ('jvp', 'split', 'imf')
VGG16_WEIGHTS_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'


def velocity_field(config, net):
  """``net`` as the library's v(x, t) (or u(x, t, s)): the times on the scales of ``model.time_scale`` and
  ``model.interval_scale`` (``VelocityField``)."""
  time_scale, interval_scale = time_scales(config)
  return VelocityField(net, time_scale=time_scale, interval_scale=interval_scale,
                       channels_last=config.training.channels_last)


def build_rectified_flow(config, net):
  """The library's ``RectifiedFlow`` around ``net``; the time scaling (t * 999 published) lives in
  ``VelocityField``. A class-conditional model (``model.num_classes``) drops labels with ``training.label_dropout``."""
  classes = num_classes(config)
  return RectifiedFlow(velocity_field(config, net), time_cond_kwarg='times',
                       noise_std=config.sampling.init_noise_scale,
                       time_eps=config.training.time_eps,
                       loss_reduction='mean' if config.training.reduce_mean else 'sum',
                       num_classes=classes, label_dropout=config.training.label_dropout if classes else 0.0)


def check_objective(config):
  """Raises a ValueError that says how to fix a ``training.objective`` this framework cannot train as configured."""
  objective = config.training.objective
  if objective not in OBJECTIVES:
    raise ValueError(f'Unknown training.objective {objective!r}; valid: {list(OBJECTIVES)}')
  if objective != 'meanflow':
    return
  if config.model.time_inputs != 2:
    raise ValueError(f"training.objective='meanflow' needs a network of two times (the start t and end s of a step): "
                     f"set --config.model.time_inputs=2 (it is {config.model.time_inputs})")
  target = config.meanflow.get('target', 'jvp')
  if target not in MEANFLOW_TARGETS:
    raise ValueError(f'Unknown meanflow.target {target!r}; valid: {list(MEANFLOW_TARGETS)}')
  if config.model.fused_norm and target != 'split':
    raise ValueError("training.objective='meanflow' differentiates the network in forward mode (dual numbers), "
                     "which has never run through the fused GroupNorm + SiLU kernel (CUDA): set "
                     "--config.model.fused_norm=False (or train without forward mode: --config.meanflow.target=split)")


def build_flow(config, net):
  """The flow that ``training.objective`` trains around ``net``: ``build_rectified_flow`` or ``build_mean_flow``."""
  check_objective(config)
  if config.training.objective == 'meanflow':
    return build_mean_flow(config, net)
  return build_rectified_flow(config, net)


def build_mean_flow(config, net):
  """The library's ``MeanFlow`` around ``net`` (a network of two times, ``model.time_inputs = 2``) with the settings
  of ``config.meanflow``; ``VelocityField`` gives the network t and s - t on ``model.time_scale`` and
  ``model.interval_scale``. A class-conditional model drops labels with ``training.label_dropout``; guidance is
  trained in (``meanflow.guidance_*``). ``meanflow.target='split'`` trains it without a forward-mode pass, as the
  library's ``SplitMeanFlow`` (``meanflow.split_point``); 'imf' as ``ImprovedMeanFlow`` (the network's own velocity
  as the tangent)."""
  m, classes = config.meanflow, num_classes(config)
  distribution_kwargs = ({'mean': m.time_mean, 'std': m.time_std} if m.time_distribution == 'logit_normal' else {})
  end_kwargs = None
  if m.get('separate_end_times', False):
    if m.time_distribution != 'logit_normal':
      raise ValueError(f"meanflow.separate_end_times draws the end times from a logit-normal of meanflow.end_time_mean "
                       f"and end_time_std: set meanflow.time_distribution='logit_normal' "
                       f"(it is {m.time_distribution!r})")
    end_kwargs = {'mean': m.end_time_mean, 'std': m.end_time_std}
  interval = checked_interval('meanflow.guidance', m.guidance_t_min, m.guidance_t_max)
  field = velocity_field(config, net)
  kwargs = dict(time_distribution=m.time_distribution, time_distribution_kwargs=distribution_kwargs,
                interval_fraction=m.interval_fraction, end_time_distribution_kwargs=end_kwargs,
                uniform_pair_fraction=m.uniform_pair_fraction,
                adaptive_weight_power=m.adaptive_weight_power, adaptive_weight_constant=m.adaptive_weight_constant,
                loss_reduction='mean' if config.training.reduce_mean else 'sum',
                noise_std=config.sampling.init_noise_scale, num_classes=classes,
                label_dropout=config.training.label_dropout if classes else 0.0,
                guidance_scale=m.guidance_scale, guidance_mix=m.guidance_mix, guidance_interval=interval)
  if m.get('target', 'jvp') == 'split':
    return SplitMeanFlow(field, split_point=m.split_point, **kwargs)
  if m.get('target', 'jvp') == 'imf':
    return ImprovedMeanFlow(field, **kwargs)
  return MeanFlow(field, **kwargs)


OPTIMIZERS = {'Adam': torch.optim.Adam, 'AdamW': torch.optim.AdamW}


def get_optimizer(config, params, device=torch.device('cpu')):
  """``optim.optimizer`` with the configured lr, (beta1, 0.999), eps and weight decay: 'Adam' (published; its weight
  decay is an L2 term added to the gradient) or 'AdamW' (the decay decoupled from the gradient's moments,
  Loshchilov & Hutter 2019; the transformers' setting). The fused kernel (``optim.fused``, on CUDA and the CPU) skips
  non-finite updates without a host read (``get_step_fn``)."""
  optim = config.optim
  if optim.optimizer not in OPTIMIZERS:
    raise ValueError(f"Unknown optim.optimizer {optim.optimizer!r}; valid optimisers: {list(OPTIMIZERS)}")
  fused = {'fused': True} if optim.fused and device.type in ('cuda', 'cpu') else {}
  return OPTIMIZERS[optim.optimizer](params, lr=optim.lr, betas=(optim.beta1, 0.999), eps=optim.eps,
                                    weight_decay=optim.weight_decay, **fused)


def build_training_state(config, device):
  """Network, EMA, optimiser and step, as one dict (the unit that checkpoints save and restore)."""
  net = create_model(config).to(device)
  if config.training.channels_last:
    net = net.to(memory_format=torch.channels_last)
  ema = ExponentialMovingAverage(net.parameters(), decay=config.model.ema_rate)
  optimizer = get_optimizer(config, net.parameters(), device)
  return {'model': net, 'ema': ema, 'optimizer': optimizer, 'step': 0}


def learning_rate(config, step):
  """Linear warm-up: lr * min(step / warmup, 1), where ``step`` counts the updates already made (published)."""
  warmup = config.optim.warmup
  return config.optim.lr * min(step / warmup, 1.0) if warmup > 0 else config.optim.lr


def reflow_time_schedule(schedule, eps, u_shaped_a=4.0):
  """``times(batch_size, device)`` of a reflow stage (Liu et al. 2022, Sec. 3.3), or None for 'uniform'.

  'uniform': t ~ U[eps, 1] (reflow: the next rectified flow); 't0': t = eps (one-step distillation); 't1': t = 1
  (one-step inversion); an integer k: t uniform on the k-step Euler grid eps + i (1 - eps) / k (k-step distillation);
  'u_shaped': the 2-rectified flow++'s U-shaped times (Lee et al. 2024), density proportional to exp(a t) +
  exp(a (1 - t)) = 2 e^(a / 2) cosh(a (t - 1/2)) with a = ``u_shaped_a`` (their code's ``--a``; 4 in their runs),
  drawn by the library's ``flow_math.TIME_DISTRIBUTIONS['u_shaped']``, whose cosh(a' (2t - 1)) has a' = a / 2, and
  squeezed into [eps, 1] as ``flow_math.sample_times`` does.
  """
  schedule = str(schedule)
  if schedule == 'uniform':
    return None
  if schedule == 't0':
    return lambda batch_size, device, generator=None: torch.full((batch_size,), eps, device=device)
  if schedule == 't1':
    return lambda batch_size, device, generator=None: torch.ones(batch_size, device=device)
  if schedule == 'u_shaped':
    if not u_shaped_a > 0:
      raise ValueError(f'reflow.u_shaped_a must be > 0 (4 in Lee et al. 2024), got {u_shaped_a}')
    return lambda batch_size, device, generator=None: flow_math.sample_times(
        batch_size, 'u_shaped', eps=eps, device=device, generator=generator, a=u_shaped_a / 2)
  if schedule.isdigit() and int(schedule) >= 1:
    k = int(schedule)
    return lambda batch_size, device, generator=None: (
        torch.randint(0, k, (batch_size,), device=device, generator=generator) * (1.0 - eps) / k + eps)
  raise ValueError(f"Unknown reflow.reflow_t_schedule {schedule!r}; valid: 'uniform', 't0', 't1', 'u_shaped', or an "
                   "integer k >= 1")


def build_lpips(weights_path='', random_backbone=False):
  """LPIPS with a VGG16 backbone (Zhang et al. 2018) from the ``lpips`` package, which ships its linear layers.

  The backbone's ImageNet weights come from ``weights_path`` or torch's hub cache (downloaded once on request);
  ``random_backbone=True`` keeps lpips' randomly initialised backbone (``pnet_rand``), for tests.
  """
  import lpips

  model = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False)
  if not random_backbone:
    path = pretrained_weights.resolve_pretrained_weights(VGG16_WEIGHTS_URL, weights_path, 'VGG16 weights for LPIPS',
                                                         'reflow.lpips_weights_path')
    weights = pretrained_weights.load_weights_only(path, 'VGG16 weights for LPIPS', 'reflow.lpips_weights_path')
    features = {key[len('features.'):]: value for key, value in weights.items() if key.startswith('features.')}
    for part in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
      part.load_state_dict({key: features[key] for key in part.state_dict()})
  return model.eval().requires_grad_(False)


def lpips_distance(lpips_model, x, y):
  """LPIPS of [-1, 1] images after bilinear upsampling to 224x224 as the published distillation did, (B,)."""
  if x.shape[1] == 1:
    x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
  x = F.interpolate(x, size=(224, 224), mode='bilinear', align_corners=False)
  y = F.interpolate(y, size=(224, 224), mode='bilinear', align_corners=False)
  return lpips_model(x, y).reshape(-1)


def library_loss_flow(flow, loss, lpips_model=None):
  """The library's ``RectifiedFlow(loss=loss)`` on ``flow``'s network and settings. 'lpips_huber': (pseudo-Huber +
  LPIPS) between the data estimate X1_hat and X1, weighted 1 / (1 - t) (Lee et al. 2024's LPIPS-Huber with its 1/t
  weighting, in this library's time), LPIPS measured as ``lpips_distance`` does; 'pseudo_huber': the pseudo-Huber
  distance of the velocity to X1 - X0 (c = 0.00054 sqrt(d)), the recipe's loss without LPIPS, for runs without the
  VGG16 weights. Its times are always given."""
  perceptual = functools.partial(lpips_distance, lpips_model) if loss == 'lpips_huber' else None
  return RectifiedFlow(flow.model, time_cond_kwarg=flow.time_cond_kwarg, predict=flow.predict,
                       time_eps=flow.time_eps, loss=loss, perceptual_loss=perceptual, noise_std=flow.noise_std,
                       num_classes=flow.num_classes, label_cond_kwarg=flow.label_cond_kwarg,
                       label_dropout=flow.label_dropout)


def draw_times(flow, size, device, dtype=torch.float32, generator=None, times_fn=None):
  """The times of ``size`` training samples as the flow's keyword arguments: {'times': (size,)} for a rectified
  flow (``times_fn(size, device, generator)`` where given), {'times', 'end_times'} (t <= s) for a ``MeanFlow`` (and
  'split_fractions' for a ``SplitMeanFlow``: ``sample_training_times``)."""
  if isinstance(flow, MeanFlow):
    return flow.sample_training_times(size, device=device, dtype=dtype, generator=generator)
  if times_fn is None:
    return {'times': flow.sample_times(size, device=device, dtype=dtype, generator=generator)}
  return {'times': times_fn(size, device, generator)}


def draw_noise_and_times(flow, x1, generator=None, global_batch=None, rows=slice(None), times_fn=None, labels=None,
                         train=True):
  """(X0, times, label drops) for ``rows`` of a global batch whose rows ``x1`` are: drawn for all ``global_batch``
  rows and sliced, so that a sample gets the same noise, times and label dropout whatever the number of processes
  and micro-batches. ``times`` are the flow's time arguments (``draw_times``). Label drops (``flow.label_dropout``,
  after the times) are drawn only in training with labels, so the random streams of unconditional runs are those
  of before; otherwise they are None, or all False (held-out losses with labels)."""
  size = global_batch or x1.shape[0]
  noise = flow.sample_noise((size, *x1.shape[1:]), device=x1.device, dtype=x1.dtype, generator=generator)[rows]
  times = {key: value[rows] for key, value in draw_times(flow, size, x1.device, x1.dtype, generator,
                                                          times_fn).items()}
  drops = None
  if labels is not None:
    if train and flow.label_dropout:
      drops = flow_math.draw_label_drops(size, flow.label_dropout, device=x1.device, generator=generator)[rows]
    else:
      drops = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
  return noise, times, drops


def get_loss_fn(config, flow, reflow=False, lpips_model=None, times_fn=None):
  """``loss_fn(x0, x1, generator=None, global_batch=None, rows=slice(None), labels=None, train=True) -> scalar``.

  x0 is None for 1-RF training (noise is drawn), a pair otherwise; ``labels`` (B,) condition a class-conditional
  flow, after label dropout when ``train``. The noise and times are drawn from ``generator``
  for a global batch of ``global_batch`` of which ``x1`` holds ``rows`` (``draw_noise_and_times``). Reflow stages
  take their time schedule and loss from ``config.reflow``: 'l2' is the flow's own loss on the pairs, 'lpips' the
  LPIPS between the one-step estimate X1_hat = X_t + (1 - t) v and X1, 'lpips+l2' their sum, 'lpips_huber' the
  library's LPIPS-Huber loss (``library_loss_flow``; the 2-rectified flow++'s, Lee et al. 2024), 'pseudo_huber'
  the library's pseudo-Huber loss on the velocity (no LPIPS, no download). ``times_fn(size,
  device, generator)``, where given, replaces the time distribution of 1-RF training (a seam for replaying given
  times, as tests/test_training_parity.py does).
  """
  if not reflow:

    def flow_loss(x0, x1, generator=None, global_batch=None, rows=slice(None), labels=None, train=True):
      noise, times, drops = draw_noise_and_times(flow, x1, generator, global_batch, rows, times_fn, labels, train)
      return flow(x1, noise=noise if x0 is None else x0, **times, labels=labels, label_drops=drops)

    return flow_loss
  if isinstance(flow, MeanFlow):
    raise ValueError("training.objective='meanflow' trains from data (--mode train); the reflow stages train "
                     "rectified flows: set --config.training.objective=rectified_flow for them")
  times_fn = reflow_time_schedule(config.reflow.reflow_t_schedule, config.training.time_eps,
                                  config.reflow.u_shaped_a)
  loss_name = config.reflow.reflow_loss
  if loss_name not in REFLOW_LOSSES:
    raise ValueError(f'Unknown reflow.reflow_loss {loss_name!r}; valid: {list(REFLOW_LOSSES)}')
  if loss_name in LPIPS_LOSSES and lpips_model is None:
    raise ValueError(f"reflow.reflow_loss={loss_name!r} needs an LPIPS model")
  huber_flow = library_loss_flow(flow, loss_name, lpips_model) if loss_name.endswith('huber') else None

  def loss_fn(x0, x1, generator=None, global_batch=None, rows=slice(None), labels=None, train=True):
    noise, times, drops = draw_noise_and_times(flow, x1, generator, global_batch, rows, times_fn, labels, train)
    noise, times = noise if x0 is None else x0, times['times']
    if loss_name == 'l2':
      return flow(x1, noise=noise, times=times, labels=labels, label_drops=drops)
    if huber_flow is not None:
      return huber_flow(x1, noise=noise, times=times, labels=labels, label_drops=drops)
    noise, times, x_t, prediction = flow.predict_on_path(x1, noise=noise, times=times, labels=labels,
                                                         label_drops=drops)
    clean = flow_math.to_clean(flow.predict, prediction, x_t, times)
    loss = lpips_distance(lpips_model, clean, x1)
    if loss_name == 'lpips+l2':
      target = flow_math.prediction_target(flow.predict, noise, x1)
      loss = loss + flow_math.per_sample_squared_error(prediction, target, flow.loss_reduction)
    return loss.mean()

  return loss_fn


def skips_updates_on_device(optimizer):
  """Whether ``optimizer`` can skip an update on a device flag (fused Adam reads ``found_inf``, as AMP's grad scaler
  uses it): then a non-finite update is dropped without the host reading the flag."""
  return any(group.get('fused') for group in optimizer.param_groups)


def get_step_fn(config, loss_fn, params, optimizer, ema, train, *, device=torch.device('cpu'), generator=None,
                ddp_module=None, grad_scaler=None):
  """One update (``train=True``) or one held-out loss on the EMA weights (``train=False``).

  ``train_step(state, micro_batches)`` takes ``state = {'model', 'ema', 'optimizer', 'step'}`` and this process's
  micro-batches of one global batch, a list of ``datasets.Batch`` in model space (``rows``: their slice of the
  global batch of ``training.batch_size``). Gradients are accumulated over the micro-batches (``ddp_module``
  all-reduces them once, at the last) and averaged, so the update is that of the whole global batch. Noise and
  times come from ``generator``. Returns this process's mean loss (a detached device tensor).

  An update whose loss or gradient norm is not finite changes no weight, EMA shadow or Adam moment, and adds one to
  ``state['nonfinite_pending']`` (a device tensor: ``count_skipped_updates`` moves it to ``state['nonfinite_steps']``
  when the loop reads it). With fused Adam (``optim.fused``) this decision stays on the device: the update makes no
  host read at all. With fp16 an overflow of the scaled gradients is the ``grad_scaler``'s to handle (it skips the
  update and lowers its scale; not counted). ``eval_step(state, batch)`` returns the loss of a ``Batch``
  on the EMA weights (no label dropout).

  ``train_step`` is ``set_learning_rate(state['step'])``, then ``update(state, micro_batches)`` (the device work),
  then ``state['step'] += 1``; both parts are attributes of it, so that ``speed.cuda_graphs.GraphedTrainStep`` can
  capture ``update`` and run the host parts around each replay.
  """
  params = [p for p in params if p.requires_grad]
  global_batch = config.training.batch_size
  max_norm = config.optim.grad_clip if config.optim.grad_clip >= 0 else float('inf')
  scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
  on_device = skips_updates_on_device(optimizer)

  def set_learning_rate(step):
    """The warm-up lr of update ``step`` (0-based) in every group: written into a device lr in place (the captured
    update of ``speed.cuda_graphs.GraphedTrainStep`` reads it there; a fill launches no host read), else assigned."""
    lr = learning_rate(config, step)
    for group in optimizer.param_groups:
      if isinstance(group['lr'], torch.Tensor):
        group['lr'].fill_(lr)
        group['scheduled_lr'] = lr  # The exact value, for checkpoints: the device lr is its float32 rounding.
      else:
        group['lr'] = lr

  def update(state, micro_batches):
    """The device work of one update at the learning rate already set: no host read with fused Adam, and no
    Python state that changes between updates, so that a CUDA graph can capture it."""
    state['model'].train()
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    # Every micro-batch draws (and slices) the global batch's noise and times: the same draws, from the same state.
    replay = generator.get_state() if generator is not None and len(micro_batches) > 1 else None
    for index, micro_batch in enumerate(micro_batches):
      last = index == len(micro_batches) - 1
      if replay is not None and index > 0:
        generator.set_state(replay)
      with contextlib.nullcontext() if ddp_module is None or last else ddp_module.no_sync():
        with training_autocast(config, device):
          loss = loss_fn(micro_batch.x0, micro_batch.x1, generator=generator, global_batch=global_batch,
                         rows=micro_batch.rows, labels=micro_batch.labels)
        scaler.scale(loss / len(micro_batches)).backward()
      total = total + loss.detach().float()
    loss = total / len(micro_batches)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    # After unscaling, a non-finite gradient norm is also what an fp16 overflow looks like.
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    skipped = ~torch.isfinite(loss) if scaler.is_enabled() else ~finite
    if state.get('nonfinite_pending') is None:
      state['nonfinite_pending'] = torch.zeros((), dtype=torch.int64, device=loss.device)
    state['nonfinite_pending'].add_(skipped.to(torch.int64))  # In place: a captured update keeps counting.
    if not on_device and not finite:  # One host read per update; the state stays that of the last good one.
      optimizer.zero_grad(set_to_none=True)
      scaler.update()
      return loss
    if scaler.is_enabled():
      scaler.step(optimizer)  # Fused Adam receives the scaler's own found_inf: no host read either.
      scaler.update()
    elif on_device:
      optimizer.grad_scale, optimizer.found_inf = None, (~finite).to(torch.float32)
      optimizer.step()
      optimizer.found_inf = None
    else:
      optimizer.step()
    ema.update(params, apply=finite)
    return loss

  def train_step(state, micro_batches):
    set_learning_rate(state['step'])
    loss = update(state, micro_batches)
    state['step'] += 1  # A skipped update still consumes its batch, so the data order stays that of the step.
    return loss

  train_step.set_learning_rate, train_step.update = set_learning_rate, update

  @torch.no_grad()
  def eval_step(state, batch):
    state['model'].eval()
    with ema.average_parameters(params), training_autocast(config, device):
      loss = loss_fn(batch.x0, batch.x1, labels=batch.labels, train=False)
    return loss.detach().float()

  return train_step if train else eval_step
