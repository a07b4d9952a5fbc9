"""The fused GroupNorm + SiLU (``model.fused_norm``): the same function as the published pair, in either memory
format, forward and backward, and traceable by torch.compile as one graph. Its CUDA speed is a benchmark's
(benchmarks/gpu_report.py), its CUDA numerics tests/test_cuda.py's."""
import pytest
import torch
import torch.nn.functional as F

import models
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
