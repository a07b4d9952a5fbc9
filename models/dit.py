"""DiT: the Diffusion Transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023), on
pixels, as a velocity network of this framework.

The image is cut into p x p patches, each a token of width D (a convolution of kernel = stride = p) plus a fixed 2-D
sine-cosine position embedding; N transformer blocks with adaLN-Zero conditioning (Sec. 3.2 of the paper) act on the
T = (H / p) (W / p) tokens, and a final adaptive LayerNorm and linear map turn each token back into its patch's
p * p * C values. The conditioning vector c (B, D) is the embedding of the network time, plus the embedding of the
label (class-conditional) and of the step's length (two times).
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import layers
from models.conditioning import checked_interval, labels_or_null
from models.model_registry import register_model

# (depth, hidden size, heads) of the published model sizes (Peebles & Xie 2023, Table 1).
DIT_SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
CUSTOM_SIZE = 'custom'  # A size given by its depth, hidden size and heads.
FREQUENCY_EMBEDDING_SIZE = 256  # Sinusoids of a scalar input (time, interval) before its MLP, as DiT's.
MLP_RATIO = 4  # Hidden width of each block's MLP over the token width.
NORM_EPS = 1e-6  # The LayerNorms' epsilon, as DiT's.


def dit_architecture(size, depth=0, hidden_size=0, num_heads=0):
  """{'depth', 'hidden_size', 'num_heads'} of a DiT: ``size`` a key of ``DIT_SIZES``, with depth, hidden_size and
  num_heads left at 0, or 'custom' with all three > 0."""
  if size == CUSTOM_SIZE:
    if min(depth, hidden_size, num_heads) <= 0:
      raise ValueError(f"model.dit_size='{CUSTOM_SIZE}' needs model.dit_depth, model.dit_hidden_size and "
                       f"model.dit_num_heads > 0 (they are {depth}, {hidden_size}, {num_heads})")
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads)
  if size not in DIT_SIZES:
    raise ValueError(f"Unknown model.dit_size {size!r}; valid: {sorted(DIT_SIZES)} or '{CUSTOM_SIZE}'")
  if depth or hidden_size or num_heads:
    raise ValueError(f"model.dit_size={size!r} fixes depth, hidden size and heads {DIT_SIZES[size]}: leave "
                     f"model.dit_depth, dit_hidden_size, dit_num_heads at 0, or set model.dit_size='{CUSTOM_SIZE}'")
  depth, hidden_size, num_heads = DIT_SIZES[size]
  return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads)


def linear(in_dim, out_dim, weight_init=nn.init.xavier_uniform_):
  """nn.Linear with ``weight_init`` on its weight and a zero bias (DiT's initialisation: Xavier-uniform by default)."""
  layer = nn.Linear(in_dim, out_dim)
  weight_init(layer.weight)
  nn.init.zeros_(layer.bias)
  return layer


small_normal_ = functools.partial(nn.init.normal_, std=0.02)  # DiT's init of its embeddings' weights.


def modulate(tokens, shift, scale):
  """Adaptive LayerNorm's affine map, x (1 + scale) + shift: (B, T, D) tokens, (B, 1, D) shift and scale."""
  return tokens * (1 + scale) + shift


def sincos_position_embedding(grid_size, dim):
  """The fixed 2-D sine-cosine embedding of a grid_size x grid_size grid of tokens (MAE, He et al. 2022; DiT),
  (grid_size**2, dim), token i at row i // grid_size and column i % grid_size: the first dim / 2 features embed the
  row and the last dim / 2 the column, each by the sinusoids of ``layers.positional_time_embedding``."""
  positions = torch.arange(grid_size, dtype=torch.float32)
  rows, cols = torch.meshgrid(positions, positions, indexing='ij')  # (g, g) each
  return torch.cat([layers.positional_time_embedding(rows.flatten(), dim // 2),
                    layers.positional_time_embedding(cols.flatten(), dim // 2)], dim=1)  # (g * g, dim)


def attention_kernels(queries):
  """The attention kernels that may run on ``queries``: any, except under forward-mode differentiation (MeanFlow's
  JVP): the fused kernels (flash, memory-efficient, cuDNN, the CPU's flash) have no forward derivative in PyTorch's
  derivatives.yaml, while the math kernel is made of operations that do."""
  if forward_ad.unpack_dual(queries).tangent is None:
    return contextlib.nullcontext()
  return sdpa_kernel(SDPBackend.MATH)


class FrequencyEmbedding(nn.Module):
  """A scalar per sample (B,) -> (B, D): its sinusoids (``layers.positional_time_embedding``, 256 features), then
  Linear, SiLU, Linear (DiT's TimestepEmbedder); with ``zero_output`` the last Linear starts at zero."""

  def __init__(self, hidden_size, zero_output=False):
    super().__init__()
    self.mlp = nn.Sequential(linear(FREQUENCY_EMBEDDING_SIZE, hidden_size, small_normal_), nn.SiLU(),
                             linear(hidden_size, hidden_size, nn.init.zeros_ if zero_output else small_normal_))

  def forward(self, values):
    sinusoids = layers.positional_time_embedding(values, FREQUENCY_EMBEDDING_SIZE)  # (B, 256), float32
    return self.mlp(sinusoids.to(self.mlp[0].weight.dtype))  # (B, D)


class SelfAttention(nn.Module):
  """Multi-head self-attention over the tokens (B, T, D) -> (B, T, D), computed by
  ``F.scaled_dot_product_attention``: softmax(q k^T / sqrt(D / heads)) v per head."""

  def __init__(self, hidden_size, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = linear(hidden_size, 3 * hidden_size)
    self.out = linear(hidden_size, hidden_size)

  def forward(self, tokens):
    batch, length, width = tokens.shape
    qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
    queries, keys, values = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, D / heads)
    with attention_kernels(queries):
      attended = F.scaled_dot_product_attention(queries, keys, values)  # (B, heads, T, D / heads)
    return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class DiTBlock(nn.Module):
  """A transformer block with adaLN-Zero (Peebles & Xie 2023, Sec. 3.2): from c, shift, scale and gate for the
  attention and for the MLP,
    x <- x + gate_attn * Attention(LN(x) (1 + scale_attn) + shift_attn),
    x <- x + gate_mlp * MLP(LN(x) (1 + scale_mlp) + shift_mlp),
  with the linear map that gives them zero-initialised, so that the block starts as the identity. Dropout acts on each
  branch's output before its gate (the residual dropout of Vaswani et al. 2017, Sec. 5.4; DiT has none)."""

  def __init__(self, hidden_size, num_heads, dropout):
    super().__init__()
    self.attention_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
    self.attention = SelfAttention(hidden_size, num_heads)
    self.mlp_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
    self.mlp = nn.Sequential(linear(hidden_size, MLP_RATIO * hidden_size), nn.GELU(approximate='tanh'),
                             linear(MLP_RATIO * hidden_size, hidden_size))
    self.dropout = nn.Dropout(dropout)
    self.modulation = nn.Sequential(nn.SiLU(), linear(hidden_size, 6 * hidden_size, nn.init.zeros_))

  def forward(self, tokens, conditioning):
    """(B, T, D) tokens and (B, D) conditioning c -> (B, T, D)."""
    shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = (
        self.modulation(conditioning)[:, None].chunk(6, dim=2))  # 6 x (B, 1, D)
    attended = self.attention(modulate(self.attention_norm(tokens), shift_attn, scale_attn))
    tokens = tokens + gate_attn * self.dropout(attended)
    transformed = self.mlp(modulate(self.mlp_norm(tokens), shift_mlp, scale_mlp))
    return tokens + gate_mlp * self.dropout(transformed)


class FinalLayer(nn.Module):
  """Adaptive LayerNorm (shift and scale from c) and a linear map of each token to its patch's p * p * C values,
  (B, T, D) -> (B, T, p * p * C), in the order (row in patch, column in patch, channel); both linear maps start at
  zero, so the network's output starts at zero."""

  def __init__(self, hidden_size, patch_values):
    super().__init__()
    self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
    self.modulation = nn.Sequential(nn.SiLU(), linear(hidden_size, 2 * hidden_size, nn.init.zeros_))
    self.linear = linear(hidden_size, patch_values, nn.init.zeros_)

  def forward(self, tokens, conditioning):
    shift, scale = self.modulation(conditioning)[:, None].chunk(2, dim=2)  # 2 x (B, 1, D)
    return self.linear(modulate(self.norm(tokens), shift, scale))


@register_model(name='dit')
class DiT(nn.Module):
  """The Diffusion Transformer (Peebles & Xie 2023) on images of ``num_channels`` x ``image_size`` x ``image_size``.

  Input: x (B, C, H, W), the network time ``time_cond`` (B,) (t * ``model.time_scale``, from ``VelocityField``;
  embedded as is by its sinusoids) and, for a class-conditional model (``num_classes`` > 0), ``labels`` (B,) in
  [0, num_classes], where ``num_classes`` is the null class of classifier-free guidance (the default when no labels
  are given).
  Output: a tensor shaped like x (the velocity, for rectified flows).

  c = time embedding + label embedding (num_classes + 1 rows of D, N(0, 0.02^2) as DiT's) + interval embedding.
  A network of two times (``time_inputs`` = 2, MeanFlow's average velocity over a step [t, s]) also takes
  ``interval_cond`` (B,), the step's length (s - t) * ``model.interval_scale``, embedded by its own
  ``FrequencyEmbedding`` whose last layer starts at zero: registered after every other module, a fresh two-time
  network has the parameters of the one-time network built from the same seed, plus that embedding, and computes its
  function whatever s - t is.

  ``dropout`` acts on every attention and MLP branch (see ``DiTBlock``); DiT is ``dropout`` = 0. Data in [0, 1]
  (``centered`` False) is mapped to [-1, 1] first.
  """

  def __init__(self, *, image_size, num_channels, centered, patch_size, depth, hidden_size, num_heads, dropout,
               num_classes=0, time_inputs=1):
    super().__init__()
    if time_inputs not in (1, 2):
      raise ValueError(f'model.time_inputs={time_inputs!r}: use 1 (the time t) or 2 (also the interval length s - t '
                       f'of a step, for MeanFlow)')
    if num_classes < 0:
      raise ValueError(f'model.num_classes={num_classes}: use 0 (unconditional) or the number of classes')
    if patch_size < 1 or image_size % patch_size:
      valid = [size for size in range(1, image_size + 1) if image_size % size == 0]
      raise ValueError(f'model.patch_size={patch_size} must divide data.image_size={image_size}; valid: {valid}')
    if hidden_size % num_heads:
      raise ValueError(f'model.dit_hidden_size={hidden_size} must be a multiple of model.dit_num_heads={num_heads}')
    if hidden_size % 4 or hidden_size < 8:
      raise ValueError(f'model.dit_hidden_size={hidden_size} must be a multiple of 4 and at least 8 (the position '
                       f'embedding gives rows and columns a sine and a cosine of at least 2 frequencies each)')
    self.centered = centered
    self.num_channels = num_channels
    self.patch_size = patch_size
    self.grid_size = image_size // patch_size
    self.num_classes = num_classes
    self.time_inputs = time_inputs

    self.patch_embedding = nn.Conv2d(num_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
    nn.init.xavier_uniform_(self.patch_embedding.weight.view(hidden_size, -1))  # As a linear map of a patch.
    nn.init.zeros_(self.patch_embedding.bias)
    self.register_buffer('position_embedding', sincos_position_embedding(self.grid_size, hidden_size),
                         persistent=False)  # (T, D); fixed: a function of the architecture, not in state dicts.
    self.time_embedding = FrequencyEmbedding(hidden_size)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, dropout) for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * num_channels)
    if num_classes:
      self.label_embedding = nn.Embedding(num_classes + 1, hidden_size)
      small_normal_(self.label_embedding.weight)
    if time_inputs == 2:  # Registered last: the other parameters (and their initial values) are the one-time net's.
      self.interval_embedding = FrequencyEmbedding(hidden_size, zero_output=True)

  def forward(self, x, time_cond, labels=None, interval_cond=None):
    conditioning = self.time_embedding(time_cond)  # (B, D)
    interval_cond = checked_interval(interval_cond, self.time_inputs, x.shape[0])
    if interval_cond is not None:
      conditioning = conditioning + self.interval_embedding(interval_cond)
    labels = labels_or_null(labels, self.num_classes, x.shape[0], x.device)
    if labels is not None:
      conditioning = conditioning + self.label_embedding(labels)
    if not self.centered:
      x = 2 * x - 1.0  # Data in [0, 1] -> [-1, 1].

    tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, T, D), token i = patch (i // g, i % g)
    tokens = tokens + self.position_embedding
    for block in self.blocks:
      tokens = block(tokens, conditioning)
    return self.unpatchify(self.final_layer(tokens, conditioning))  # (B, C, H, W)

  def unpatchify(self, patches):
    """(B, T, p * p * C) values of each token's patch (row in patch, column in patch, channel) -> (B, C, H, W)."""
    batch, grid, patch = patches.shape[0], self.grid_size, self.patch_size
    patches = patches.reshape(batch, grid, grid, patch, patch, self.num_channels)  # (B, g, g, p, p, C)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.num_channels, grid * patch, grid * patch)
