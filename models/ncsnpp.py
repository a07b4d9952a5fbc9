"""NCSN++ / DDPM++ U-Net (Song et al. 2021), in the module order of the published checkpoints.

Every submodule lives in one flat ``all_modules`` list, consumed in order by ``forward``; this is what fixes the
``all_modules.<i>`` names of released state_dicts, so the order of construction below must not change.
"""
import numpy as np
import torch
from torch import nn

from models import layers
from models.registry import register_model

_SUPPORTED = {
    'resblock_type': ('biggan',),
    'progressive': ('none',),
    'progressive_input': ('none',),
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

  Input: x (B, C, H, W) and the network time ``time_cond`` (B,) on the published scale t*999.
  Output: a tensor shaped like x (the velocity, for rectified flows).
  """

  def __init__(self, *, image_size, num_channels, centered, nf, ch_mult, num_res_blocks, attn_resolutions,
               dropout, resamp_with_conv, conditional, fir, fir_kernel, skip_rescale, resblock_type,
               progressive, progressive_input, progressive_combine, attention_type, init_scale,
               embedding_type, fourier_scale, conv_size, scale_by_sigma, nonlinearity, normalization,
               sigma_min, sigma_max, num_scales):
    super().__init__()
    settings = dict(resblock_type=resblock_type, progressive=progressive, progressive_input=progressive_input,
                    embedding_type=embedding_type, normalization=normalization, attention_type=attention_type)
    for key, value in settings.items():
      if value not in _SUPPORTED[key]:
        raise ValueError(f'model.{key}={value!r} is not supported yet; supported: {_SUPPORTED[key]}')
    if conv_size != 3:
      raise ValueError(f'model.conv_size={conv_size} is not supported; the published models use 3')
    if image_size % 2 ** (len(ch_mult) - 1):
      raise ValueError(f'data.image_size={image_size} must be divisible by 2**(len(model.ch_mult)-1)='
                       f'{2 ** (len(ch_mult) - 1)}')
    del resamp_with_conv, progressive_combine  # Only used by the progressive / DDPM-block variants.
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

    resolutions = [image_size // 2 ** i for i in range(self.num_resolutions)]
    modules.append(layers.conv2d(num_channels, nf, 3))
    skip_channels = [nf]
    in_ch = nf
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
        skip_channels.append(in_ch)

    modules += [resnet_block(in_ch), attn_block(in_ch), resnet_block(in_ch)]  # Middle.

    for level in reversed(range(self.num_resolutions)):  # Upsampling path.
      for _ in range(num_res_blocks + 1):
        out_ch = nf * ch_mult[level]
        modules.append(resnet_block(in_ch + skip_channels.pop(), out_ch))
        in_ch = out_ch
      if resolutions[level] in self.attn_resolutions:
        modules.append(attn_block(in_ch))
      if level != 0:
        modules.append(resnet_block(in_ch, up=True))
    assert not skip_channels

    modules.append(layers.group_norm(in_ch))
    modules.append(layers.conv2d(in_ch, num_channels, 3, init_scale=init_scale))
    self.all_modules = nn.ModuleList(modules)

  def forward(self, x, time_cond):
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
    if not self.centered:
      x = 2 * x - 1.0  # Data in [0, 1] -> [-1, 1].

    hs = [next(modules)(x)]
    for level in range(self.num_resolutions):
      for _ in range(self.num_res_blocks):
        h = next(modules)(hs[-1], temb)
        if h.shape[-1] in self.attn_resolutions:
          h = next(modules)(h)
        hs.append(h)
      if level != self.num_resolutions - 1:
        hs.append(next(modules)(hs[-1], temb))

    h = hs[-1]
    h = next(modules)(h, temb)
    h = next(modules)(h)
    h = next(modules)(h, temb)

    for level in reversed(range(self.num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
      if h.shape[-1] in self.attn_resolutions:
        h = next(modules)(h)
      if level != 0:
        h = next(modules)(h, temb)
    assert not hs

    h = self.act(next(modules)(h))
    h = next(modules)(h)
    assert next(modules, None) is None, 'not every module of all_modules was used'
    if self.scale_by_sigma:
      h = h / used_sigmas.reshape(-1, *([1] * (h.dim() - 1)))
    return h
