"""CUDA-graph capture of a velocity call v(x, t): one graph per input shape, each call one replay.

A sampler calls the same network tens to hundreds of times on inputs of one shape. Eager PyTorch launches every
kernel of the forward from Python, so for a small network at a large batch the host's launch work, not the GPU,
sets the pace (RK45 with the digits-size DDPM++ at batch 1024 on an H100: 11 ms per call for a forward that needs
well under 1 ms of device time). A CUDA graph records the forward's kernels once and replays them all with one
launch. ``GraphedVelocity`` wraps any ``velocity(x, t)``; ``sampling.get_sampling_fn`` wraps the network call of
evaluation, pair generation and snapshot grids with it (``sampling.cuda_graph``).
"""
import itertools

import torch

from datasets.batch import Batch


class _CapturedCall:
  """One captured call: the graph and the static tensors it reads (x, t, extras) and writes (out)."""

  __slots__ = ('graph', 'x', 't', 'extras', 'out')

  def __init__(self, graph, x, t, extras, out):
    self.graph, self.x, self.t, self.extras, self.out = graph, x, t, extras, out


class GraphedVelocity:
  """``velocity(x, t, *extras)`` replayed from CUDA graphs, one per (x shape, x dtype, t shape, t dtype, device,
  shapes and dtypes of the extra tensors, e.g. the (B,) labels of a class-conditional model).

  On CUDA with autograd off, the first call of a new key runs ``velocity`` ``warmup_calls`` times on a side stream
  (cuDNN autotuning and lazy initialisation happen there, as the PyTorch docs on CUDA graphs require), then captures
  one call into a ``torch.cuda.CUDAGraph`` that reads static buffers x (B, ...) and t (B,) and writes a static
  output. Every call copies x, t and the extras into those buffers, replays the graph and returns a clone of the
  output (the next replay overwrites it; solvers keep several velocities alive). Anywhere else (the CPU, autograd
  on, t or an extra not a tensor on the device of x, ``enabled=False``) it calls ``velocity(x, t, *extras)``
  directly: an exact pass-through.

  Weights: a graph reads the memory its kernels were recorded with. Weights changed in place between calls
  (``param.copy_``: EMA weights swapped in and out, ``load_state_dict``, optimiser steps) are read by the next
  replay, so nothing needs recapturing. A parameter or buffer given new memory (``param.data = ...``,
  ``module.to(dtype)``, ``load_state_dict(assign=True)``, a replaced submodule) is NOT: the graph would go on reading
  the old memory. ``refresh()`` compares the addresses, dtypes and shapes of ``module``'s parameters and buffers and
  the train/eval flag of each submodule with those at capture, and drops every graph if anything differs, so the
  next call recaptures; it walks the module (well under a millisecond), so call it once per solve, not per call
  (``sampling.get_sampling_fn`` calls it at the start of every sample). ``invalidate()`` drops the graphs by hand.

  What ``velocity`` must allow to be captured: no host reads (``.item()``, Python branches on tensor values), no
  other streams, the same work on every call (eval mode; no dropout). Graphs of different shapes share one memory
  pool, which is safe because replays run one after another on one stream and each output is cloned before the
  next replay. That pool keeps the memory of the forward's intermediate tensors (the eager forward's peak) for as
  long as the graphs live, where an eager call would return it to the caching allocator after each call; where
  memory is tight (256x256 models at large batches, with Inception features computed on the same GPU), turn graphs
  off (``sampling.cuda_graph=False``). ``captures`` and ``replays`` count what happened.
  """

  def __init__(self, velocity, module=None, enabled=True, warmup_calls=3):
    if warmup_calls < 1:
      raise ValueError(f'warmup_calls must be at least 1 (warm-up precedes every capture), got {warmup_calls}')
    self.velocity = velocity
    self.module = module
    self.enabled = enabled
    self.warmup_calls = warmup_calls
    self.graphs = {}
    self.captures = 0
    self.replays = 0
    self._pool = None
    self._signature = None

  def __call__(self, x, t, *extras):
    if (not (self.enabled and x.is_cuda and all(isinstance(value, torch.Tensor) and value.device == x.device
                                                 for value in (t, *extras)))
        or torch.is_grad_enabled()):
      return self.velocity(x, t, *extras)
    # Static buffers made under inference_mode cannot be written outside it, hence the mode in the key.
    key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, x.device, torch.is_inference_mode_enabled(),
           tuple((tuple(value.shape), value.dtype) for value in extras))
    call = self.graphs.get(key)
    if call is None:
      call = self._capture(key, x, t, extras)
    call.x.copy_(x)
    call.t.copy_(t)
    for static, value in zip(call.extras, extras):
      static.copy_(value)
    call.graph.replay()
    self.replays += 1
    return call.out.clone()

  def invalidate(self):
    """Drops every graph (their memory returns to the caching allocator); the next call of each shape recaptures."""
    self.graphs.clear()
    self._pool = None
    self._signature = None

  def refresh(self):
    """Drops the graphs when ``module``'s parameters, buffers or modes differ from those they were captured with."""
    if self.graphs and self._weights_signature() != self._signature:
      self.invalidate()

  def _weights_signature(self):
    """(train flags of every submodule, (address, dtype, shape) of every parameter and buffer) of ``module``."""
    if self.module is None:
      return None
    tensors = itertools.chain(self.module.parameters(), self.module.buffers())
    return (tuple(m.training for m in self.module.modules()),
            tuple((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) for tensor in tensors))

  def _capture(self, key, x, t, extras):
    signature = self._weights_signature()
    if self.graphs and signature != self._signature:  # Other shapes were captured with other weight memory.
      self.invalidate()
    self._signature = signature
    device = x.device
    with torch.cuda.device(device):
      static_x, static_t, static_extras = x.clone(), t.clone(), tuple(value.clone() for value in extras)
      current = torch.cuda.current_stream(device)
      side = torch.cuda.Stream(device)
      side.wait_stream(current)
      with torch.cuda.stream(side):
        for _ in range(self.warmup_calls):
          self.velocity(static_x, static_t, *static_extras)
      current.wait_stream(side)
      if self._pool is None:
        self._pool = torch.cuda.graph_pool_handle()
      graph = torch.cuda.CUDAGraph()
      # thread_local: CUDA calls of other threads (a data loader's pinning thread) do not break the capture.
      with torch.cuda.graph(graph, pool=self._pool, capture_error_mode='thread_local'):
        static_out = self.velocity(static_x, static_t, *static_extras)
    call = _CapturedCall(graph, static_x, static_t, static_extras, static_out)
    self.graphs[key] = call
    self.captures += 1
    return call


def graph_capture_obstacle(config, device, optimizer):
  """Why the update of this run cannot be captured by ``GraphedTrainStep`` (a sentence), or None when it can."""
  from distributed import is_distributed  # Here, not at the top: distributed imports nothing of this module's.

  training = config.training
  if device.type != 'cuda':
    return f'the device is {device.type}, and CUDA graphs need CUDA'
  if is_distributed():
    return 'DDP all-reduces gradients from hooks outside a graph (torchrun with several processes)'
  if training.grad_accum_steps != 1:
    return f'training.grad_accum_steps={training.grad_accum_steps}: micro-batches replay the noise generator'
  if training.compile:
    return 'training.compile is on (torch.compile makes its own graphs)'
  if training.precision == 'fp16':
    return "training.precision='fp16': the grad scaler reads its overflow flag on the host"
  if training.objective == 'meanflow':
    return "training.objective='meanflow': its update (a forward-mode pass) has not been captured on a GPU yet"
  if not all(group.get('fused') for group in optimizer.param_groups):
    return 'optim.fused is off: the unfused Adam reads its step counts and the non-finite flag on the host'
  return None


class GraphedTrainStep:
  """``train_step(state, micro_batches)`` of ``losses.get_step_fn`` with its device work replayed from one CUDA graph.

  The first ``warmup_updates`` updates run eagerly on a side stream (cuDNN autotuning, Adam's state, lazy
  initialisation; the PyTorch docs ask for warm-up before a capture); they are real updates of the run. The next
  update captures ``train_step.update`` once: forward, backward, clipping, the non-finite check, fused Adam and the
  EMA, reading static x0 / x1 buffers and the learning rate from a device tensor, with ``generators`` (the path
  generator of the noise and times) registered with the graph, so that every replay draws new numbers and advances
  them as the eager update does; the default CUDA generator (dropout) is registered by PyTorch itself. That update
  and every later one then run as: lr written in place (``train_step.set_learning_rate``), batch copied in, one
  replay, ``state['step'] += 1``; a few launches instead of thousands, no host read.

  What stays valid between replays: weights, Adam moments and steps, EMA shadows and count, and the skipped-update
  counter are all updated in place, so checkpoints, snapshots and held-out losses read the current values; the
  optimiser's lr is a float32 device tensor from the first update on (so warm-up updates and replays use the same
  lr) and its groups are marked capturable from the capture on (``checkpoints.save_checkpoint`` writes both back
  as an eager run does). What must not happen after the capture:
  parameters given new memory (``load_state_dict(assign=True)``, ``module.to``), other batch shapes (the loop
  has one), a change of the train/eval modes inside the update. ``graph_capture_obstacle`` lists the settings it
  does not support; run_lib then trains eagerly and logs why.
  """

  WARMUP_UPDATES = 3  # Eager updates before the capture.

  def __init__(self, train_step, optimizer, generators=(), warmup_updates=WARMUP_UPDATES):
    if warmup_updates < 1:
      raise ValueError(f'warmup_updates must be at least 1 (Adam creates its state in the first), got '
                       f'{warmup_updates}')
    self.train_step = train_step
    self.optimizer = optimizer
    self.generators = list(generators)
    self.warmup_updates = warmup_updates
    self.eager_updates = 0
    self.replays = 0
    self.graph = None
    self._x0 = self._x1 = self._rows = self._labels = self._loss = None
    # The lr as a float32 device tensor from the first update on (fused CUDA kernels read a float lr from device
    # memory): warm-up updates and replays then use the same lr, bit for bit, also across a resume.
    for group in optimizer.param_groups:
      if not isinstance(group['lr'], torch.Tensor):
        group['scheduled_lr'] = float(group['lr'])  # What checkpoints store (the tensor holds its float32 rounding).
        group['lr'] = torch.tensor(float(group['lr']), dtype=torch.float32, device=group['params'][0].device)

  def __call__(self, state, micro_batches):
    if len(micro_batches) != 1:
      raise ValueError(f'A graph-captured update takes one micro-batch, got {len(micro_batches)} '
                       f'(set training.cuda_graph=False for gradient accumulation)')
    if self.graph is None and self.eager_updates < self.warmup_updates:
      return self._eager(state, micro_batches)
    (x0, x1, rows, labels), = micro_batches  # One datasets.Batch.
    with torch.cuda.device(x1.device):
      if self.graph is None:
        self._capture(state, x0, x1, rows, labels)
      self._check_batch(x0, x1, rows, labels)
      state['model'].train()  # What the graph does; the flag only keeps Python's view of the module in step.
      self.train_step.set_learning_rate(state['step'])
      self._x1.copy_(x1)
      if x0 is not None:
        self._x0.copy_(x0)
      if labels is not None:
        self._labels.copy_(labels)
      self.graph.replay()
      self.replays += 1
      state['step'] += 1
      return self._loss.clone()  # The next replay overwrites the static loss.

  def _eager(self, state, micro_batches):
    with torch.cuda.device(micro_batches[0].x1.device):
      current = torch.cuda.current_stream()
      side = torch.cuda.Stream()
      side.wait_stream(current)
      with torch.cuda.stream(side):
        loss = self.train_step(state, micro_batches)
      current.wait_stream(side)
    self.eager_updates += 1
    return loss

  def _check_batch(self, x0, x1, rows, labels):
    if (x1.shape != self._x1.shape or x1.dtype != self._x1.dtype or (x0 is None) != (self._x0 is None)
        or (x0 is not None and (x0.shape != self._x0.shape or x0.dtype != self._x0.dtype)) or rows != self._rows
        or (labels is None) != (self._labels is None)
        or (labels is not None and (labels.shape != self._labels.shape or labels.dtype != self._labels.dtype))):
      def describe(t):
        return 'absent' if t is None else f'{tuple(t.shape)} ({t.dtype})'

      raise ValueError(f'The captured update takes x1 {describe(self._x1)}, x0 {describe(self._x0)}, labels '
                       f'{describe(self._labels)} and rows {self._rows}; got x1 {describe(x1)}, x0 {describe(x0)}, '
                       f'labels {describe(labels)} and rows {rows}. Every batch of a run must have one shape; set '
                       f'training.cuda_graph=False otherwise.')

  def _capture(self, state, x0, x1, rows, labels):
    device = x1.device
    for group in self.optimizer.param_groups:  # The lr is a device tensor since __init__.
      group['capturable'] = True
    if state.get('nonfinite_pending') is None:  # Made here: a tensor made inside the capture would be rewritten.
      state['nonfinite_pending'] = torch.zeros((), dtype=torch.int64, device=device)
    self._x1, self._rows = x1.clone(), rows
    self._x0 = None if x0 is None else x0.clone()
    self._labels = None if labels is None else labels.clone()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    for generator in self.generators:
      graph.register_generator_state(generator)
    try:
      # thread_local: CUDA calls of other threads (a loader's pinning thread) do not break the capture.
      with torch.cuda.graph(graph, capture_error_mode='thread_local'):
        self._loss = self.train_step.update(state, [Batch(self._x0, self._x1, self._rows, self._labels)])
    except RuntimeError as error:
      # The error that ends the capture is often a consequence ("capture invalidated") of the one before it.
      cause = f'{error}' if error.__context__ is None else f'{error}; first: {error.__context__}'
      raise RuntimeError(f'CUDA-graph capture of the training update failed at step {state["step"]} ({cause}). '
                         f'Resume without it: --config.training.cuda_graph=False (the preemption checkpoints are '
                         f'those of the eager updates before it).') from error
    self.graph = graph
