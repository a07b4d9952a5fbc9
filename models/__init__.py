"""Model registry, EMA, DDPM++ / NCSN++, DiT and the time wrapper."""
from models import autoencoder, dit, layers, ncsnpp  # noqa: F401  (ncsnpp registers 'ncsnpp', dit 'dit')
from models.ema import ExponentialMovingAverage
from models.model_registry import get_model_class, registered_models
from models.velocity import VelocityField, time_scales

__all__ = ['ExponentialMovingAverage', 'VelocityField', 'create_model', 'flow_shape', 'is_latent',
           'model_config_summary', 'num_classes', 'registered_models', 'time_scales']


def num_classes(config):
  """``model.num_classes``: 0 for an unconditional model."""
  return config.model.num_classes


def is_latent(config):
  """Whether the run trains in an autoencoder's latent space (``latent.autoencoder`` set)."""
  return bool(config.latent.autoencoder)


def flow_shape(config):
  """(C, H, W) of the space the flow and its network live in: the images', or the autoencoder's latents of the
  ``data.image_size`` images in a latent run (read from the autoencoder's config, not its weights)."""
  data = config.data
  if is_latent(config):
    return autoencoder.latent_shape(config.latent, data.image_size)
  return data.num_channels, data.image_size, data.image_size


def shape_kwargs(config):
  """The networks' image_size, num_channels and centered: the data's, or the latents' (taken as they are)."""
  channels, size, _ = flow_shape(config)
  return dict(image_size=size, num_channels=channels, centered=config.data.centered or is_latent(config))


def ncsnpp_kwargs_from_config(config):
  """The keyword arguments of ``NCSNpp`` (model.name = 'ncsnpp'); checkpoints record them (``model_config_summary``)."""
  m = config.model
  return dict(**shape_kwargs(config), nf=m.nf,
              ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
              dropout=m.dropout, resamp_with_conv=m.resamp_with_conv, conditional=m.conditional, fir=m.fir,
              fir_kernel=tuple(m.fir_kernel), skip_rescale=m.skip_rescale, resblock_type=m.resblock_type,
              progressive=m.progressive, progressive_input=m.progressive_input,
              progressive_combine=m.progressive_combine, attention_type=m.attention_type, init_scale=m.init_scale,
              embedding_type=m.embedding_type, fourier_scale=m.fourier_scale, conv_size=m.conv_size,
              scale_by_sigma=m.scale_by_sigma, nonlinearity=m.nonlinearity, normalization=m.normalization,
              sigma_min=m.sigma_min, sigma_max=m.sigma_max, num_scales=m.num_scales,
              num_classes=num_classes(config), time_inputs=m.time_inputs)


def dit_kwargs_from_config(config):
  """The keyword arguments of ``DiT`` (model.name = 'dit'): its size from ``model.dit_size`` (or 'custom' and
  ``model.dit_depth``, ``dit_hidden_size``, ``dit_num_heads``), its patches from ``model.patch_size``."""
  m = config.model
  if m.fused_norm:
    raise ValueError('model.fused_norm fuses the GroupNorm + SiLU of the DDPM++ / NCSN++ residual blocks, which a DiT '
                     'does not have: set --config.model.fused_norm=False')
  architecture = dit.dit_architecture(m.dit_size, depth=m.dit_depth, hidden_size=m.dit_hidden_size,
                                      num_heads=m.dit_num_heads)
  return dict(**shape_kwargs(config), patch_size=m.patch_size,
              **architecture, dropout=m.dropout, num_classes=num_classes(config), time_inputs=m.time_inputs)


# model.name -> the function that gives that network its keyword arguments from a config.
KWARGS_FROM_CONFIG = {'ncsnpp': ncsnpp_kwargs_from_config, 'dit': dit_kwargs_from_config}


def model_kwargs_from_config(config):
  """The keyword arguments of the network named by ``config.model.name``."""
  name = config.model.name
  get_model_class(name)  # An unknown name is an error that lists the registered ones.
  return KWARGS_FROM_CONFIG[name](config)


def model_config_summary(config):
  """One line naming the architecture a config builds, for error messages about mismatched checkpoints."""
  settings = ', '.join(f'{k}={v}' for k, v in model_kwargs_from_config(config).items())
  return f'model.name={config.model.name}, {settings}'


def create_model(config):
  """Builds the network of ``config.model`` (on the CPU; the caller moves it), with its residual blocks' GroupNorm
  + SiLU fused on CUDA where ``model.fused_norm`` asks for it (the same parameters either way)."""
  net = get_model_class(config.model.name)(**model_kwargs_from_config(config))
  return layers.use_fused_norm_act(net, config.model.fused_norm)
