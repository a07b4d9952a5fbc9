"""Config -> library adapters for the samplers, and sample grids."""

import torch
from torchvision.utils import save_image

import atomic_files
from models import flow_shape, num_classes
from rectified_flow_pytorch import MeanFlow, flow_math, solvers
from speed import cuda_graphs
from speed.precision import autocast, check_sampling_precision

# sampling.use_ode_sampler: the solvers of the library, and MeanFlow's own jumps z + (s - t) u(z, t, s).
SAMPLERS = (*solvers.SOLVERS, 'mean_flow')
# Samplers with a fixed number of steps (sampling.sample_N), which sampling.sample_steps may vary.
FIXED_STEP_SAMPLERS = (*solvers.FIXED_STEP_SOLVERS, 'mean_flow')
# sampling.ode_state_dtype: the dtype of the solver's state x and of its step control (RK45's error estimate).
ODE_STATE_DTYPES = {'float32': torch.float32, 'float64': torch.float64}
# Settings that change samples but were added after evaluation folders and pair folders existed: recorded in their
# manifests only when they differ from these defaults, so folders made with the defaults stay valid.
SETTINGS_RECORDED_WHEN_NOT_DEFAULT = {'ode_state_dtype': 'float32', 'precision': 'fp32', 'guidance_scale': 1.0,
                                      'guidance_t_min': 0.0, 'guidance_t_max': 1.0}


def guidance_scale(config):
  """``sampling.guidance_scale`` (1: no guidance)."""
  return config.sampling.guidance_scale


def guidance_interval(config):
  """(t_min, t_max) of the times that ``sampling.guidance_scale`` acts on (``sampling.guidance_t_min`` and
  ``_t_max``); None for all of [0, 1], the default."""
  s = config.sampling
  return checked_interval('sampling.guidance', s.guidance_t_min, s.guidance_t_max)


def teacher_guidance_interval(config):
  """``guidance_interval`` of the online reflow teacher: ``reflow.teacher_guidance_t_min`` and ``_t_max``."""
  r = config.reflow
  return checked_interval('reflow.teacher_guidance', r.teacher_guidance_t_min, r.teacher_guidance_t_max)


def checked_interval(prefix, t_min, t_max):
  interval = (float(t_min), float(t_max))
  try:
    flow_math.check_guidance_interval(interval)
  except ValueError:
    raise ValueError(f'{prefix}_t_min={interval[0]}, {prefix}_t_max={interval[1]}: guidance acts where t_min <= t '
                     f'<= t_max, which needs 0 <= t_min < t_max <= 1 (t = 0 is noise, 1 data), e.g. '
                     f'--config.{prefix}_t_min=0.5') from None
  return None if interval == (0.0, 1.0) else interval


def check_sampling_options(config):
  """Raises a ValueError naming the valid values for an unknown ode_state_dtype or precision, or for guidance
  asked of an unconditional model."""
  s = config.sampling
  if s.ode_state_dtype not in ODE_STATE_DTYPES:
    raise ValueError(f'Unknown sampling.ode_state_dtype {s.ode_state_dtype!r}; valid: {list(ODE_STATE_DTYPES)}')
  check_sampling_precision(s.precision)
  guidance_interval(config)
  if guidance_scale(config) != 1.0 and not num_classes(config):
    raise ValueError(f'sampling.guidance_scale={guidance_scale(config)} needs a class-conditional model '
                     f'(model.num_classes > 0); use 1.0 for an unconditional one')
  mean_flow = config.training.objective == 'meanflow'
  if mean_flow and guidance_scale(config) != 1.0:
    raise ValueError(f"sampling.guidance_scale={guidance_scale(config)}: a MeanFlow's guidance is trained into the "
                     f"network (meanflow.guidance_scale), so it samples with one evaluation per step; set "
                     f"--config.sampling.guidance_scale=1")
  if s.use_ode_sampler == 'mean_flow' and not mean_flow:
    raise ValueError("sampling.use_ode_sampler='mean_flow' jumps with a MeanFlow's average velocity: it needs "
                     "training.objective='meanflow'; a rectified flow samples with 'euler' or 'rk45'")
  sample_step_counts(config)


def sample_step_counts(config):
  """The step counts that snapshot grids and the eval sweep sample at: ``sampling.sample_steps``, or (None,), the
  configured ``sampling.sample_N`` alone, when it is empty. Counts need a fixed-step sampler."""
  counts = tuple(int(n) for n in config.sampling.sample_steps)
  if not counts:
    return (None,)
  if config.sampling.use_ode_sampler not in FIXED_STEP_SAMPLERS:
    raise ValueError(f'sampling.sample_steps={counts} needs a fixed-step sampler ({list(FIXED_STEP_SAMPLERS)}), '
                     f'not {config.sampling.use_ode_sampler!r}: set --config.sampling.use_ode_sampler=euler (or '
                     f'mean_flow), or --config.sampling.sample_steps=()')
  if min(counts) < 1 or len(set(counts)) != len(counts):
    raise ValueError(f'sampling.sample_steps={counts}: give distinct step counts >= 1, e.g. (1, 2)')
  return counts


def with_sample_steps(config, steps):
  """``config`` sampling with ``steps`` steps (a copy with ``sampling.sample_N = steps``); itself for None."""
  if steps is None:
    return config
  config = config.copy_and_resolve_references()
  config.sampling.sample_N = steps
  return config


def sample_labels(config, first, count):
  """The (count,) labels of samples first .. first + count - 1 of an evaluation or a pair generation (None when
  unconditional): ``eval.labels`` 'all' gives sample i the class i mod num_classes (every class equally often), a
  list '3,5,7' gives sample i its (i mod 3)-th entry. A sample's label depends only on its index, like its noise."""
  classes = num_classes(config)
  if not classes:
    return None
  spec = str(config.eval.labels).strip()
  if spec == 'all':
    choices = torch.arange(classes)
  else:
    try:
      choices = torch.tensor([int(part) for part in spec.replace(' ', '').strip('()[]').split(',') if part])
    except ValueError:
      choices = torch.tensor([])
    if not choices.numel() or choices.min() < 0 or choices.max() >= classes:
      raise ValueError(f"eval.labels={spec!r}: use 'all' or a comma-separated list of classes in [0, {classes}), "
                       f"e.g. --config.eval.labels='3,5,7'")
  return choices[torch.arange(first, first + count) % len(choices)]


def sample_indexed(config, flow, sample_fn, first, count, device, straightness=False):
  """Samples first .. first + count - 1 of a seeded set (the samples of an evaluation, the pairs of a generation)
  with ``sample_fn`` (``get_sampling_fn``): sample i's noise comes from its own seed (``flow_math.indexed_noise``),
  its label from its index (``sample_labels``), and the stochastic sampler's draws from a generator seeded by
  (``seed``, ``first``), so that a sample does not depend on how the set is split into batches or processes.

  Returns (noise on ``device``, labels on the CPU or None, the ``solvers.ODESolution``, and with ``straightness``
  the (count,) straightness of each path (``solvers.StraightnessMeter``), else None).
  """
  shape = flow_shape(config)
  noise = flow_math.indexed_noise(config.seed, first, count, shape, flow.noise_std).to(device)
  labels = sample_labels(config, first, count)
  meter = solvers.StraightnessMeter(noise) if straightness else None
  generator = torch.Generator().manual_seed(config.seed * 2**32 + first)
  solution = sample_fn(flow, noise=noise, on_step=None if meter is None else meter.on_step, generator=generator,
                       labels=None if labels is None else labels.to(device))
  return noise, labels, solution, None if meter is None else meter.value(solution.x)


def grid_labels(config, per_class):
  """Labels of a per-class sample grid: ``per_class`` samples of every class in turn, one grid row per class."""
  return torch.arange(num_classes(config)).repeat_interleave(per_class)


def sampler_settings(config):
  """Everything that determines a sample given its noise (recorded in evaluation and pair manifests).

  ``sampling.ode_state_dtype`` and ``sampling.precision`` appear only when they differ from their defaults
  (float32, fp32): a manifest made before they existed, with the defaults, is then still equal to the one made now,
  while a folder made with the defaults is refused for float64 or bf16 samples and vice versa (evaluation
  ``SampleRounds`` compares the whole manifest; reflow ``PairShardWriter`` every key of the new one).

  Not among them: ``sampling.rk45_sync_every``, since RK45 masks the attempts made after t1, so the samples are
  bitwise the same for every value (tests/test_samplers.py) and only the number of network calls changes; and
  ``sampling.cuda_graph``, since a graph replays the kernels that the eager call launches, on the same inputs
  (the CUDA tests of tests/test_sampling_options.py require graphed and eager RK45 and Euler samples to agree to
  1e-5; the CPU never graphs). The two can differ only by cuDNN choosing another algorithm at capture, which eager
  calls of their own may do as well from one process to the next (``cudnn.benchmark``).
  """
  check_sampling_options(config)
  s = config.sampling
  settings = {'sampler': s.use_ode_sampler, 'sample_N': s.sample_N, 'ode_tol': s.ode_tol,
              'eps': config.training.time_eps, 'sigma_variance': s.sigma_variance,
              'init_noise_scale': s.init_noise_scale}
  for key, default in SETTINGS_RECORDED_WHEN_NOT_DEFAULT.items():
    if s[key] != default:
      settings[key] = s[key]
  if num_classes(config):  # Which label each sample was made for, and how strongly guided.
    settings.update(num_classes=num_classes(config), labels=str(config.eval.labels),
                    guidance_scale=guidance_scale(config))
  return settings


def network_velocity(flow, precision='fp32', guidance=1.0, interval=None, step=None):
  """v(x, t, labels=None) of ``flow`` with the network in its own parameter dtype, whatever the dtype of the
  solver's state; with labels, guided by ``guidance`` over the times of ``interval`` (``RectifiedFlow.velocity``).
  For a ``MeanFlow`` it is the average velocity u(x, t, min(t + step, 1)), the jump of a step of length ``step``
  (None: u(x, t, t), the instantaneous velocity, for an ODE solver); its guidance is trained in.

  x (B, ...) and t (B,) are cast to the dtype of the network's first floating-point parameter, the network runs
  (under bf16 autocast for ``precision='bf16'``) and its velocity is cast back to the dtype of x. The autocast
  weight cache is off, so the weights are cast inside every call: a CUDA graph of the call then reads the current
  weights, not copies cast when it was captured.
  """
  check_sampling_precision(precision)

  def velocity(x, t, labels=None):
    state_dtype = x.dtype
    parameter = next((p for p in flow.parameters() if p.is_floating_point()), None)
    network_dtype = parameter.dtype if parameter is not None else x.dtype
    x, t_network = x.to(network_dtype), t.to(network_dtype)
    with autocast(precision, x.device.type, cache_enabled=False):
      if isinstance(flow, MeanFlow):
        end = t_network if step is None else (t_network + step).clamp(max=1.0)
        v = flow.average_velocity(x, t_network, end, labels=labels)
      else:
        v = flow.velocity(x, t_network, labels=labels, guidance_scale=1.0 if labels is None else guidance,
                          guidance_interval=None if labels is None else interval)
    return v.to(state_dtype)

  return velocity


def get_sampling_fn(config, shape):
  """``sample(flow, noise=None, on_step=None, generator=None, labels=None) -> solvers.ODESolution``, i.e.
  (samples, nfe).

  Integrates ``flow.velocity`` from t = eps to 1 with ``sampling.use_ode_sampler`` as the published samplers do;
  ``on_step`` receives every step (e.g. a ``StraightnessMeter``), ``generator`` drives the stochastic sampler.
  ``nfe`` counts every network call made; ``.contributing_nfe`` the calls that shaped the samples (the published
  NFE), which differ only for RK45 with ``sampling.rk45_sync_every`` = k > 1. A class-conditional flow samples
  ``labels`` (B,) with ``sampling.guidance_scale`` w; a guided call evaluates the network on the batch doubled,
  so both counts are then network evaluations per sample, twice the solver's calls.

  ``sampling.rk45_sync_every = 0`` (auto) is 4 on CUDA, where reading the done flag after every step would stall the
  GPU once per step (the issue's requirement: no per-step device -> host copy), at the price of on average 1.5
  masked attempts (about 9 calls, 7% of the published 127 NFE); and 1 on the CPU, where the read costs nothing.

  Speed and precision: the solver's state and step control are in ``sampling.ode_state_dtype`` (float64 is scipy's
  solve_ivp of the published sampler: the same x1 to 1e-4 and the same NFE); the network runs in its parameter dtype
  (``network_velocity``), under bf16 autocast with ``sampling.precision='bf16'``; on CUDA with
  ``sampling.cuda_graph`` the network call is replayed from a CUDA graph per batch shape (``speed.cuda_graphs``), kept
  for the last flow sampled and checked against its weights' memory at the start of every sample. Samples come
  back in the noise's dtype (float32), as the published sampler's ``.type(torch.float32)`` of solve_ivp's result.

  A ``MeanFlow`` (``training.objective='meanflow'``) samples with 'mean_flow': ``sample_N`` jumps
  z <- z + (s - t) u(z, t, s) on the uniform grid from t = 0 to 1, one network evaluation each (the Euler loop with
  the average velocity over each step); an ODE solver ('euler', 'rk45', ...) integrates its instantaneous velocity
  u(z, t, t) instead.
  """
  name = config.sampling.use_ode_sampler
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampling.use_ode_sampler {name!r}; valid samplers: {list(SAMPLERS)}')
  check_sampling_options(config)
  eps, steps, tol = config.training.time_eps, config.sampling.sample_N, config.sampling.ode_tol
  sync_every = config.sampling.rk45_sync_every
  if sync_every < 0:
    raise ValueError(f'sampling.rk45_sync_every={sync_every}: use 0 (auto) or a positive number of steps')
  sigma_variance = config.sampling.sigma_variance
  if sigma_variance and name != 'euler':
    raise ValueError(f'sampling.sigma_variance={sigma_variance} needs sampling.use_ode_sampler=euler (the stochastic '
                     f'sampler is an Euler-Maruyama scheme), not {name!r}')
  state_dtype = ODE_STATE_DTYPES[config.sampling.ode_state_dtype]
  precision, use_cuda_graph = config.sampling.precision, config.sampling.cuda_graph
  guidance, interval = guidance_scale(config), guidance_interval(config)
  last = {'flow': None, 'velocity': None}  # The flow sampled last and its (graphed) network call.

  def velocity_of(flow):
    if last['flow'] is not flow:
      last['flow'] = flow
      step = 1.0 / steps if name == 'mean_flow' else None
      last['velocity'] = cuda_graphs.GraphedVelocity(network_velocity(flow, precision, guidance, interval, step),
                                                     module=flow, enabled=use_cuda_graph)
    last['velocity'].refresh()  # Recaptures where a parameter was given new memory since the last sample.
    return last['velocity']

  def sample(flow, noise=None, on_step=None, generator=None, labels=None):
    if name == 'mean_flow' and not isinstance(flow, MeanFlow):
      raise ValueError("sampling.use_ode_sampler='mean_flow' needs a MeanFlow (training.objective='meanflow')")
    if noise is None:
      noise = flow.sample_noise(shape, device=flow._device())
    graphed = velocity_of(flow)
    evaluations_per_call = 1
    if labels is None:
      if guidance != 1.0 and getattr(flow, 'num_classes', 0):
        raise ValueError(f'sampling.guidance_scale={guidance} guides toward labels: pass labels= (one per sample), '
                         f'or set --config.sampling.guidance_scale=1 for samples of the null class')
      velocity = graphed
    else:
      labels = flow.model_labels(labels, noise.shape[0], noise.device)
      if not isinstance(flow, MeanFlow) and flow.is_guided(labels, guidance, interval):
        evaluations_per_call = 2

      def velocity(x, t):
        return graphed(x, t, labels)
    x = noise.to(state_dtype)
    if name == 'mean_flow':  # MeanFlow's grid: t_i = i / N, each step a jump with u(x, t_i, t_i + 1 / N).
      solution = solvers.euler(velocity, x, steps=steps, t0=0.0, t1=1.0, on_step=on_step)
    elif name == 'euler':  # The published grid: t_i = eps + i (1 - eps) / N with steps of 1/N.
      solution = solvers.euler(velocity, x, steps=steps, t0=eps, t1=1.0, step_size=1.0 / steps,
                               sigma_variance=sigma_variance, noise_std=flow.noise_std, generator=generator,
                               on_step=on_step)
    else:
      solution = solvers.solve(name, velocity, x, t0=eps, t1=1.0, steps=steps, rtol=tol, atol=tol,
                               sync_every=sync_every or (4 if noise.device.type == 'cuda' else 1), on_step=on_step)
    return solution.with_x(solution.x.to(noise.dtype)).with_evaluations_per_call(evaluations_per_call)

  return sample


def per_class_grid(images, labels, per_class):
  """(images, columns) of a grid with one row per class present in ``labels``: its first ``per_class`` images,
  classes in increasing order; a class with fewer images is padded with blank (zero) cells, so that every row holds
  one class. ``images`` (N, ...) and ``labels`` (N,) match."""
  labels = torch.as_tensor(labels)
  rows = [torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique(sorted=True).tolist()]
  columns = max(len(row) for row in rows)
  blank = torch.zeros_like(images[:1])
  cells = [torch.cat([images[row]] + [blank] * (columns - len(row))) for row in rows]
  return torch.cat(cells), columns


def save_sample_grid(images, path, nrow=None):
  """Writes (B, C, H, W) images in [0, 1] as one PNG grid, atomically (temporary file, then rename)."""
  nrow = nrow or max(1, int(images.shape[0] ** 0.5))
  with atomic_files.atomic_open(path) as handle:
    save_image(images.clamp(0.0, 1.0).float().cpu(), handle, format='png', nrow=nrow, padding=2)
  return path
