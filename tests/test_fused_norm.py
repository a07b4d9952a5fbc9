"""The fused GroupNorm + SiLU (``model.fused_norm``): the same function as the published pair, in either memory
format, forward and backward, traceable by torch.compile as one graph, and compiled within Dynamo's recompile limit
for the CIFAR-10 DDPM++'s every workload (past it, eager instead of an error). Its CUDA speed is a benchmark's
(benchmarks/gpu_report.py), its CUDA numerics tests/test_cuda.py's."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import models
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as cifar10_ddpmpp_config
from models import layers
from tests.helpers import tiny_digits_config


def published_pair(x, norm):
  return F.silu(norm(x))


def inputs(channels_last, seed=0):
  generator = torch.Generator().manual_seed(seed)
  x = torch.randn(3, 16, 5, 6, generator=generator) * 3 + 1
  if channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
  norm = layers.group_norm(16)  # 4 groups, eps 1e-6, as the published models.
  with torch.no_grad():
    norm.weight.copy_(torch.rand(16, generator=generator) + 0.5)
    norm.bias.copy_(torch.randn(16, generator=generator))
  return x.requires_grad_(), norm


def forward_and_grads(function, x, norm):
  out = function(x, norm)
  out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))  # Any fixed cotangent.
  grads = [x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone()]
  x.grad = norm.weight.grad = norm.bias.grad = None
  return out.detach(), grads


def fused(x, norm):
  return layers.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


@pytest.mark.parametrize('channels_last', [False, True])
def test_group_norm_silu_is_silu_of_group_norm_forward_and_backward(channels_last):
  x, norm = inputs(channels_last)
  want, want_grads = forward_and_grads(published_pair, x, norm)
  got, got_grads = forward_and_grads(fused, x, norm)
  torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
  assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_group_norm_silu_keeps_bf16_inputs_bf16_with_fp32_statistics():
  x, norm = inputs(channels_last=True)
  x16 = x.detach().to(torch.bfloat16)
  with torch.no_grad():
    got = fused(x16, norm)
    # The published pair under autocast: GroupNorm in fp32 (autocast's fp32 list), SiLU, then one cast.
    want = F.silu(norm(x16.float())).to(torch.bfloat16)
  assert got.dtype == torch.bfloat16
  torch.testing.assert_close(got.float(), want.float(), rtol=0.0, atol=float(want.abs().max()) * 2 ** -7)


def test_group_norm_silu_traces_as_one_graph_with_its_backward():
  """fullgraph=True fails on any graph break; aot_eager traces forward and backward without compiling kernels."""
  x, norm = inputs(channels_last=True, seed=1)
  compiled = torch.compile(layers.group_norm_silu, backend='aot_eager', fullgraph=True, dynamic=False)
  want, want_grads = forward_and_grads(fused, x, norm)
  got, got_grads = forward_and_grads(
      lambda x, norm: compiled(x, norm.weight, norm.bias, norm.num_groups, norm.eps), x, norm)
  torch.testing.assert_close(got, want)
  for g, w in zip(got_grads, want_grads):
    torch.testing.assert_close(g, w)


def test_fused_norm_sets_every_residual_block_and_keeps_the_parameters():
  config = tiny_digits_config()
  plain = models.create_model(config)
  config.model.fused_norm = True
  torch.manual_seed(0)
  fused_net = models.create_model(config)
  blocks = [m for m in fused_net.modules() if isinstance(m, layers.ResnetBlockBigGANpp)]
  assert blocks and all(block.fused_norm for block in blocks)
  assert not any(getattr(m, 'fused_norm', False) for m in plain.modules())
  assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fused_net.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Specialisations of the compiled function (issue 22): Dynamo compiles it once per guard set, up to its recompile
# limit. Counted with backends that compile nothing, on meta tensors of the real shapes (no memory, no kernels).

class RecordingBackend:
  """A torch.compile backend that runs the captured graph as it is and records the input shape it was traced for:
  ints where a dimension is specialised, 'B' where it is symbolic. One record per Dynamo (re)compilation."""

  def __init__(self):
    self.shapes = []

  def __call__(self, graph_module, example_inputs):
    x = next(node.meta['example_value'] for node in graph_module.graph.nodes if node.op == 'placeholder'
             and isinstance(node.meta.get('example_value'), torch.Tensor) and node.meta['example_value'].dim() == 4)
    self.shapes.append(tuple(size if isinstance(size, int) else 'B' for size in x.shape))
    return graph_module.forward


@pytest.fixture
def fresh_dynamo():
  """No compiled code of an earlier test (all torch.compile wrappers of group_norm_silu share its code object)."""
  torch._dynamo.reset()
  yield
  torch._dynamo.reset()


@pytest.fixture(scope='module')
def cifar10_norm_inputs():
  """{grad mode: sorted (C, H, W, dtype)} of the inputs of the residual blocks' GroupNorms (those ``norm_act``
  fuses) of the class-conditional CIFAR-10 DDPM++, from one forward at batch 1 on the CPU in each grad mode: no grad
  (held-out loss, sampling) and grad with the input requiring it (bits/dim's divergence)."""
  config = cifar10_ddpmpp_config()
  config.model.num_classes = 10  # Guided sampling needs a class-conditional model; the shapes are the same.
  torch.manual_seed(0)
  net = models.create_model(config).eval()
  seen = set()

  def record(norm, args):
    x = args[0]
    assert x.is_contiguous() and x.requires_grad == torch.is_grad_enabled()
    seen.add((*x.shape[1:], x.dtype))

  blocks = [m for m in net.modules() if isinstance(m, layers.ResnetBlockBigGANpp)]
  for block in blocks:
    block.GroupNorm_0.register_forward_pre_hook(record)
    block.GroupNorm_1.register_forward_pre_hook(record)
  size = config.data.image_size
  x, t, labels = torch.randn(1, config.data.num_channels, size, size), torch.rand(1), torch.tensor([3])
  inputs = {}
  for grad in (False, True):
    seen.clear()
    with torch.set_grad_enabled(grad):
      net(x.clone().requires_grad_(grad), t, labels)
    inputs[grad] = sorted(seen, key=str)
  return inputs


def eval_sweep_workloads(config):
  """(name, batch, grad) of one checkpoint's evaluation of a guided class-conditional CIFAR-10 model with the config's
  batch size: each full round and the last, partial one (the 10,000 test images, the 50,000 samples)."""
  e = config.eval
  batch = e.batch_size
  test_images, samples = 10000, e.num_samples

  def rounds(total):
    return sorted({batch, total % batch or batch}, reverse=True)

  return ([('held-out loss', b, False) for b in rounds(test_images)]
          + [('sampling', b, False) for b in rounds(samples)]
          + [('guided sampling', 2 * b, False) for b in rounds(samples)]  # Conditional and null rows in one batch.
          + [('bits/dim', b, True) for b in rounds(e.bpd_num_images or test_images)])


def sweep_calls(norm_inputs, workloads):
  """(batch, C, H, W, dtype, grad) of every distinct call the sweep makes to the fused function."""
  return sorted({(batch, *shape, grad) for _, batch, grad in workloads for shape in norm_inputs[grad]}, key=str)


def call_on_meta(fused, batch, channels, height, width, dtype, grad):
  """The fused function on meta tensors (shapes, strides, dtypes and grad mode of the real call, and no data)."""
  x = torch.empty(batch, channels, height, width, dtype=dtype, device='meta', requires_grad=grad)
  weight = torch.empty(channels, device='meta', requires_grad=True)
  bias = torch.empty(channels, device='meta', requires_grad=True)
  norm = layers.group_norm(channels)
  with torch.set_grad_enabled(grad):
    return fused(x, weight, bias, norm.num_groups, norm.eps)


def test_the_cifar10_eval_sweep_needs_more_specialisations_than_the_limit_with_a_static_batch(cifar10_norm_inputs):
  """The count behind issue 22: 11 GroupNorm input shapes per (batch, grad mode, dtype) and 7 (batch, grad mode)
  in an eval sweep make 77 static-batch specialisations, over the limit of 64 (with fullgraph, a hard error)."""
  shapes = {grad: [shape[:3] for shape in inputs] for grad, inputs in cifar10_norm_inputs.items()}
  assert shapes[False] == shapes[True] and len(shapes[False]) == 11
  assert {inputs[3] for grads in cifar10_norm_inputs.values() for inputs in grads} == {torch.float32}
  workloads = eval_sweep_workloads(cifar10_ddpmpp_config())
  assert [b for _, b, _ in workloads] == [1024, 784, 1024, 848, 2048, 1696, 1024, 784]
  static_batch = sweep_calls(cifar10_norm_inputs, workloads)
  assert len(static_batch) == 77 > layers.FUSED_RECOMPILE_LIMIT
  dynamic_batch = {call[1:] for call in static_batch}  # What is left to specialise on when the batch is symbolic.
  assert len(dynamic_batch) == 22 <= layers.FUSED_RECOMPILE_LIMIT


def test_the_eval_sweep_compiles_once_per_shape_and_grad_mode_whatever_the_batch(cifar10_norm_inputs, fresh_dynamo):
  """Through the real compiled function: every call of the sweep runs (before, the 65th specialisation raised),
  with one compilation per (C, H, W, grad mode), each for a symbolic batch and static C, H, W; a second checkpoint's
  sweep compiles nothing."""
  backend = RecordingBackend()
  fused = layers.fused_group_norm_silu(backend=backend)
  calls = sweep_calls(cifar10_norm_inputs, eval_sweep_workloads(cifar10_ddpmpp_config()))
  failures = []
  for call in calls:
    try:
      out = call_on_meta(fused, *call)
      assert out.shape == call[:4] and out.dtype == call[4]
    except Exception as error:  # Counted, then reported below.
      failures.append(f'{call}: {type(error).__name__}: {error}'.splitlines()[0])
  assert not failures, f'{len(failures)} of {len(calls)} calls failed, the first: {failures[0]}'
  specialisations = {call[1:] for call in calls}  # (C, H, W, dtype, grad mode)
  assert len(specialisations) == 22
  assert sorted(backend.shapes, key=str) == sorted((('B', *key[:3]) for key in specialisations), key=str)
  for call in reversed(calls):  # The next checkpoint of the sweep.
    call_on_meta(fused, *call)
  assert len(backend.shapes) == 22


def test_a_batch_of_one_is_its_own_specialisation_and_every_other_batch_shares_one(fresh_dynamo):
  backend = RecordingBackend()
  fused = layers.fused_group_norm_silu(backend=backend)
  for batch in (1, 2, 3, 64, 1, 2048, 7):
    call_on_meta(fused, batch, 256, 8, 8, torch.bfloat16, False)
  assert backend.shapes == [(1, 256, 8, 8), ('B', 256, 8, 8)]


def test_past_the_recompile_limit_new_shapes_run_eagerly_instead_of_raising(fresh_dynamo):
  """Whatever the workload: the shapes beyond Dynamo's limit run group_norm_silu eagerly (the same function) where
  fullgraph=True raised FailOnRecompileLimitHit; those compiled before stay compiled."""
  backend = RecordingBackend()
  fused = layers.fused_group_norm_silu(backend=backend)
  generator = torch.Generator().manual_seed(2)
  with torch._dynamo.config.patch(recompile_limit=2):
    for channels in (8, 12, 16, 20, 8):
      x = torch.randn(2, channels, 3, 4, generator=generator)
      norm = layers.group_norm(channels)
      with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=generator))
        got = fused(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
        torch.testing.assert_close(got, published_pair(x, norm), rtol=1e-5, atol=1e-5)
  assert backend.shapes == [('B', 8, 3, 4), ('B', 12, 3, 4)]


def inductor_can_compile():
  return any(shutil.which(name) for name in (os.environ.get('CXX', ''), 'g++', 'clang++', 'c++') if name)


@pytest.mark.skipif(not inductor_can_compile(), reason='inductor on the CPU needs a C++ compiler')
@pytest.mark.parametrize('channels_last', [False, True])
def test_the_inductor_kernels_of_a_symbolic_batch_match_the_published_pair(channels_last, fresh_dynamo):
  """What model.fused_norm runs on CUDA, compiled by inductor for the CPU: forward and backward of two batch sizes
  from one compilation, against the published pair (the tolerances of the eager function's test)."""
  fused_fn = layers.fused_group_norm_silu()
  counter = torch._dynamo.utils.counters
  counter.clear()
  for batch, seed in ((3, 0), (5, 1)):
    x, norm = inputs(channels_last, seed=seed)
    x = torch.cat([x.detach()] * 2)[:batch].contiguous(memory_format=torch.channels_last if channels_last else
                                                       torch.contiguous_format).requires_grad_()
    want, want_grads = forward_and_grads(published_pair, x, norm)
    got, got_grads = forward_and_grads(
        lambda x, norm: fused_fn(x, norm.weight, norm.bias, norm.num_groups, norm.eps), x, norm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
      torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
  assert counter['stats']['unique_graphs'] == 1
