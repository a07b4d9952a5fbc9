"""NCSN++ / DDPM++ U-Net (Song et al. 2021), in the module order of the published checkpoints.

Every submodule lives in one flat ``all_modules`` list, consumed in order by ``forward``; this is what fixes the
``all_modules.<i>`` names of released state_dicts, so the order of construction below must not change.
"""
import numpy as np
import torch
from torch import nn

from models import layers
from models.conditioning import checked_interval, labels_or_null
from models.model_registry import register_model

_SUPPORTED = {
    'resblock_type': ('biggan',),
    'progressive': ('none', 'output_skip', 'residual'),
    'progressive_input': ('none', 'input_skip', 'residual'),
    'progressive_combine': ('sum', 'cat'),
    'embedding_type': ('positional', 'fourier'),
    'normalization': ('GroupNorm',),
    'attention_type': ('ddpm',),
}


def noise_scales(sigma_min, sigma_max, num_scales):
  """The geometric sigma grid the published models store as the ``sigmas`` buffer (float64, descending)."""
  return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


@register_model(name='ncsnpp')
class NCSNpp(nn.Module):
  """The network behind the published CIFAR-10 DDPM++ rectified flow.

  Input: x (B, C, H, W), the network time ``time_cond`` (B,) (t * ``model.time_scale``, the published 999) and, for a
  class-conditional model (``num_classes`` > 0), ``labels`` (B,) in [0, num_classes], where ``num_classes`` is the
  null class of classifier-free guidance (the default when no labels are given).
  Output: a tensor shaped like x (the velocity, for rectified flows).

  Class conditioning adds a learned embedding of the label (``label_embedding``, num_classes + 1 rows of nf * 4,
  N(0, 1) initialised as nn.Embedding is) to the time embedding after its two dense layers, so every residual
  block receives it through its time projection (as in Dhariwal & Nichol 2021's class-conditional U-Net). It is
  not one of ``all_modules``: with num_classes = 0 the state dict is exactly the published one.

  A network of two times (``time_inputs`` = 2, for MeanFlow's average velocity u(z, t, s) over a step [t, s]) also
  takes ``interval_cond`` (B,), the step's length (s - t) * ``model.interval_scale``. It is embedded by the
  sinusoidal ``positional_time_embedding`` (nf features; also in a 'fourier' network, whose log-time projection has
  no value at s = t) and its own two dense layers (``interval_embedding``: nf -> nf * 4, the activation, nf * 4 ->
  nf * 4, the structure of the time MLP) and added to the time embedding with the label embedding, so every residual
  block receives it. The last of those layers starts at zero: at initialisation the network computes exactly the
  function of its one-time counterpart (built from the same seed, its other weights are identical), that is the
  instantaneous velocity, whatever s - t is; given a trained one-time flow's weights (and these at their initial
  values) it starts as that flow, the right average velocity of an empty step (s = t). The interval's influence
  grows from the first update (the gradient of that last layer is not zero; the first layer's follows). Like
  ``label_embedding`` it is not one of ``all_modules``: with ``time_inputs`` = 1 the state dict, module order and
  outputs are those of the published networks.
  """

  def __init__(self, *, image_size, num_channels, centered, nf, ch_mult, num_res_blocks, attn_resolutions,
               dropout, resamp_with_conv, conditional, fir, fir_kernel, skip_rescale, resblock_type,
               progressive, progressive_input, progressive_combine, attention_type, init_scale,
               embedding_type, fourier_scale, conv_size, scale_by_sigma, nonlinearity, normalization,
               sigma_min, sigma_max, num_scales, num_classes=0, time_inputs=1):
    super().__init__()
    if time_inputs not in (1, 2):
      raise ValueError(f'model.time_inputs={time_inputs!r}: use 1 (the time t, as the published networks) or 2 '
                       f'(also the interval length s - t of a step, for MeanFlow)')
    if time_inputs == 2 and not conditional:
      raise ValueError('model.time_inputs=2 needs model.conditional=True: the interval embedding is added to the '
                       'time embedding, which an unconditional network does not have')
    if num_classes < 0:
      raise ValueError(f'model.num_classes={num_classes}: use 0 (unconditional) or the number of classes')
    if num_classes and not conditional:
      raise ValueError(f'model.num_classes={num_classes} needs model.conditional=True: the label embedding is added '
                       f'to the time embedding, which an unconditional network does not have')
    settings = dict(resblock_type=resblock_type, progressive=progressive, progressive_input=progressive_input,
                    progressive_combine=progressive_combine, embedding_type=embedding_type,
                    normalization=normalization, attention_type=attention_type)
    for key, value in settings.items():
      if value not in _SUPPORTED[key]:
        raise ValueError(f'model.{key}={value!r} is not supported yet; supported: {_SUPPORTED[key]}')
    if conv_size != 3:
      raise ValueError(f'model.conv_size={conv_size} is not supported; the published models use 3')
    if image_size % 2 ** (len(ch_mult) - 1):
      raise ValueError(f'data.image_size={image_size} must be divisible by 2**(len(model.ch_mult)-1)='
                       f'{2 ** (len(ch_mult) - 1)}')
    del resamp_with_conv  # Only used by the DDPM-block variant, whose resampling layers are convolutions.
    self.act = act = layers.get_activation(nonlinearity)
    self.register_buffer('sigmas', torch.tensor(noise_scales(sigma_min, sigma_max, num_scales)))
    self.centered = centered
    self.conditional = conditional
    self.embedding_type = embedding_type
    self.scale_by_sigma = scale_by_sigma
    self.nf = nf
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    self.attn_resolutions = tuple(attn_resolutions)
    self.progressive, self.progressive_input = progressive, progressive_input
    self.skip_rescale = skip_rescale

    modules = []
    if embedding_type == 'fourier':
      modules.append(layers.GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
      embed_dim = 2 * nf
    else:
      embed_dim = nf
    if conditional:
      modules.append(layers.dense(embed_dim, nf * 4))
      modules.append(layers.dense(nf * 4, nf * 4))

    def resnet_block(in_ch, out_ch=None, up=False, down=False):
      return layers.ResnetBlockBigGANpp(act, in_ch, out_ch, temb_dim=nf * 4 if conditional else None, up=up,
                                        down=down, dropout=dropout, fir=fir, fir_kernel=fir_kernel,
                                        skip_rescale=skip_rescale, init_scale=init_scale)

    def attn_block(channels):
      return layers.AttnBlockpp(channels, skip_rescale=skip_rescale, init_scale=init_scale)

    # Parameter-free FIR / nearest resamplers of the progressive paths (their learned variants are modules).
    self.pyramid_upsample = layers.Upsample(fir=fir, fir_kernel=fir_kernel, with_conv=False)
    self.pyramid_downsample = layers.Downsample(fir=fir, fir_kernel=fir_kernel, with_conv=False)

    resolutions = [image_size // 2 ** i for i in range(self.num_resolutions)]
    modules.append(layers.conv2d(num_channels, nf, 3))
    skip_channels = [nf]
    in_ch = nf
    input_pyramid_ch = num_channels
    for level in range(self.num_resolutions):  # Downsampling path.
      for _ in range(num_res_blocks):
        out_ch = nf * ch_mult[level]
        modules.append(resnet_block(in_ch, out_ch))
        in_ch = out_ch
        if resolutions[level] in self.attn_resolutions:
          modules.append(attn_block(in_ch))
        skip_channels.append(in_ch)
      if level != self.num_resolutions - 1:
        modules.append(resnet_block(in_ch, down=True))
        if progressive_input == 'input_skip':
          modules.append(layers.Combine(input_pyramid_ch, in_ch, method=progressive_combine))
          if progressive_combine == 'cat':
            in_ch *= 2
        elif progressive_input == 'residual':
          modules.append(layers.Downsample(input_pyramid_ch, in_ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
          input_pyramid_ch = in_ch
        skip_channels.append(in_ch)

    modules += [resnet_block(in_ch), attn_block(in_ch), resnet_block(in_ch)]  # Middle.

    pyramid_ch = 0
    for level in reversed(range(self.num_resolutions)):  # Upsampling path.
      for _ in range(num_res_blocks + 1):
        out_ch = nf * ch_mult[level]
        modules.append(resnet_block(in_ch + skip_channels.pop(), out_ch))
        in_ch = out_ch
      if resolutions[level] in self.attn_resolutions:
        modules.append(attn_block(in_ch))
      if progressive == 'output_skip':  # Each level adds its own RGB prediction to the upsampled pyramid.
        modules.append(layers.group_norm(in_ch))
        modules.append(layers.conv2d(in_ch, num_channels, 3, init_scale=init_scale))
        pyramid_ch = num_channels
      elif progressive == 'residual':
        if level == self.num_resolutions - 1:
          modules.append(layers.group_norm(in_ch))
          modules.append(layers.conv2d(in_ch, in_ch, 3))
        else:
          modules.append(layers.Upsample(pyramid_ch, in_ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
        pyramid_ch = in_ch
      if level != 0:
        modules.append(resnet_block(in_ch, up=True))
    assert not skip_channels

    if progressive != 'output_skip':
      modules.append(layers.group_norm(in_ch))
      modules.append(layers.conv2d(in_ch, num_channels, 3, init_scale=init_scale))
    self.all_modules = nn.ModuleList(modules)
    self.num_classes = num_classes
    if num_classes:  # Registered after all_modules, so the published parameter order is kept.
      self.label_embedding = nn.Embedding(num_classes + 1, nf * 4)
    self.time_inputs = time_inputs
    if time_inputs == 2:  # Registered last, so the published parameters (and their initial values) come first.
      self.interval_embedding = nn.ModuleList([layers.dense(nf, nf * 4), layers.dense(nf * 4, nf * 4)])
      nn.init.zeros_(self.interval_embedding[1].weight)  # Starts as the one-time network (see the class docstring).

  def forward(self, x, time_cond, labels=None, interval_cond=None):
    modules = iter(self.all_modules)
    if self.embedding_type == 'fourier':
      used_sigmas = time_cond
      temb = next(modules)(torch.log(used_sigmas))
    else:
      used_sigmas = self.sigmas[time_cond.long()]
      temb = layers.positional_time_embedding(time_cond, self.nf)
    if self.conditional:
      temb = next(modules)(temb)
      temb = next(modules)(self.act(temb))
    else:
      temb = None
    interval_cond = checked_interval(interval_cond, self.time_inputs, x.shape[0])
    if interval_cond is not None:
      interval = layers.positional_time_embedding(interval_cond, self.nf)
      interval = self.interval_embedding[1](self.act(self.interval_embedding[0](interval)))
      temb = temb + interval
    labels = labels_or_null(labels, self.num_classes, x.shape[0], x.device)
    if labels is not None:
      temb = temb + self.label_embedding(labels)
    if not self.centered:
      x = 2 * x - 1.0  # Data in [0, 1] -> [-1, 1].

    input_pyramid = x if self.progressive_input != 'none' else None
    hs = [next(modules)(x)]
    for level in range(self.num_resolutions):
      for _ in range(self.num_res_blocks):
        h = next(modules)(hs[-1], temb)
        if h.shape[-1] in self.attn_resolutions:
          h = next(modules)(h)
        hs.append(h)
      if level != self.num_resolutions - 1:
        h = next(modules)(hs[-1], temb)
        if self.progressive_input == 'input_skip':
          input_pyramid = self.pyramid_downsample(input_pyramid)
          h = next(modules)(input_pyramid, h)
        elif self.progressive_input == 'residual':
          input_pyramid = next(modules)(input_pyramid)
          input_pyramid = self._residual_sum(input_pyramid, h)
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = next(modules)(h, temb)
    h = next(modules)(h)
    h = next(modules)(h, temb)

    pyramid = None
    for level in reversed(range(self.num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
      if h.shape[-1] in self.attn_resolutions:
        h = next(modules)(h)
      if self.progressive == 'output_skip':
        level_output = self.act(next(modules)(h))  # GroupNorm, then a 3x3 conv to image channels.
        level_output = next(modules)(level_output)
        pyramid = level_output if pyramid is None else self.pyramid_upsample(pyramid) + level_output
      elif self.progressive == 'residual':
        if pyramid is None:
          pyramid = self.act(next(modules)(h))
          pyramid = next(modules)(pyramid)
        else:
          pyramid = self._residual_sum(next(modules)(pyramid), h)
          h = pyramid
      if level != 0:
        h = next(modules)(h, temb)
    assert not hs

    if self.progressive == 'output_skip':
      h = pyramid
    else:
      h = self.act(next(modules)(h))
      h = next(modules)(h)
    assert next(modules, None) is None, 'not every module of all_modules was used'
    if self.scale_by_sigma:
      h = h / used_sigmas.reshape(-1, *([1] * (h.dim() - 1)))
    return h

  def _residual_sum(self, a, b):
    return (a + b) / np.sqrt(2.0) if self.skip_rescale else a + b
