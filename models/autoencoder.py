"""The pretrained autoencoder of latent-space training (``latent.autoencoder``): diffusers' ``AutoencoderKL`` (the
VAE of Stable Diffusion, Rombach et al. 2022), an optional extra (requirements-latent.txt).

Images in [0, 1] are encoded to the moments (mean, log-variance) of the encoder's diagonal Gaussian posterior; a
latent z becomes the flow's data x = (z - shift) * scale (``latent_to_model``), and back (``model_to_latent``), with
the autoencoder's own ``scaling_factor`` and ``shift_factor`` unless the config gives them.
"""
import hashlib
import json
import os

import torch

LATENT_REQUIREMENTS = 'requirements-latent.txt'


def require_diffusers():
  """diffusers' AutoencoderKL class, or an ImportError that says how to install it."""
  try:
    from diffusers import AutoencoderKL
  except ImportError as error:
    raise ImportError(f'latent.autoencoder needs diffusers (AutoencoderKL): pip install -r {LATENT_REQUIREMENTS}'
                      ) from error
  return AutoencoderKL


def _location(latent):
  """(name or folder, keyword arguments of diffusers' loaders) of ``latent.autoencoder``: a local folder (``~``
  expanded) is read as it is; any other name is a hub id, read from the hub cache only, unless
  ``latent.download``."""
  source = os.path.expanduser(latent.autoencoder)
  kwargs = {'subfolder': latent.subfolder} if latent.subfolder else {}
  if os.path.isdir(source):
    return source, kwargs
  return latent.autoencoder, dict(kwargs, local_files_only=not latent.download)


def _missing(latent, error):
  where = os.path.join(latent.autoencoder, latent.subfolder) if latent.subfolder else latent.autoencoder
  return FileNotFoundError(
      f"latent.autoencoder={latent.autoencoder!r}: no AutoencoderKL found at {where!r} ({type(error).__name__}). Put "
      f"its config.json and diffusion_pytorch_model.safetensors in a folder and pass that folder, or fetch the hub "
      f"id once online with --config.latent.download=True (kept in the Hugging Face cache, $HF_HOME).")


def autoencoder_config(latent):
  """The autoencoder's config.json as a dict, read without its weights."""
  if not latent.autoencoder:
    raise ValueError('latent.autoencoder is empty: the run is in pixel space')
  autoencoder_class = require_diffusers()
  source, kwargs = _location(latent)
  try:
    return dict(autoencoder_class.load_config(source, **kwargs))
  except (OSError, ValueError) as error:
    raise _missing(latent, error) from error


def latent_shape(latent, image_size):
  """(channels, height, width) of the latents of ``image_size`` x ``image_size`` images: the autoencoder downsamples
  by 2 between consecutive blocks (``block_out_channels``)."""
  settings = autoencoder_config(latent)
  factor = 2 ** (len(settings['block_out_channels']) - 1)
  if image_size % factor:
    raise ValueError(f'data.image_size={image_size} is not a multiple of the autoencoder\'s downsampling factor '
                     f'{factor}: use a data.image_size divisible by {factor}')
  return settings['latent_channels'], image_size // factor, image_size // factor


def latent_factors(latent):
  """(scale, shift) of x = (z - shift) * scale: the config's, or with ``latent.factors_from_autoencoder`` the
  autoencoder's ``scaling_factor`` and ``shift_factor`` (None there: 0)."""
  if not latent.factors_from_autoencoder:
    return float(latent.scale_factor), float(latent.shift_factor)
  settings = autoencoder_config(latent)
  return float(settings['scaling_factor']), float(settings.get('shift_factor') or 0.0)


class Autoencoder:
  """A loaded AutoencoderKL in eval mode, its parameters frozen, on ``device``: ``encode`` ([0, 1] images ->
  posterior moments) and ``decode`` (latents -> [0, 1] images), each in batches of ``batch_size``, without
  gradients."""

  def __init__(self, vae, batch_size):
    self.vae = vae.eval().requires_grad_(False)
    self.batch_size = batch_size

  @property
  def device(self):
    return next(self.vae.parameters()).device

  def signature(self):
    """16 hex digits of sha256 over the config and every weight (names, shapes, dtypes and bytes): another
    autoencoder, or the same one with other weights, gives another signature."""
    digest = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(self.vae.state_dict().items()):
      tensor = tensor.detach().cpu().contiguous()
      digest.update(f'{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\n'.encode())
      digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()[:16]

  @torch.no_grad()
  def encode(self, images):
    """(B, C, H, W) images in [0, 1] -> (B, 2, c, h, w) float32: the posterior's mean and log-variance."""
    parts = []
    for chunk in images.split(self.batch_size):
      posterior = self.vae.encode(chunk.to(self.device, self.vae.dtype) * 2.0 - 1.0).latent_dist
      parts.append(torch.stack([posterior.mean, posterior.logvar], dim=1).float())
    return torch.cat(parts)

  @torch.no_grad()
  def decode(self, latents):
    """(B, c, h, w) latents z -> (B, C, H, W) float32 images in [0, 1] (clamped), on the latents' device."""
    parts = []
    for chunk in latents.split(self.batch_size):
      decoded = self.vae.decode(chunk.to(self.device, self.vae.dtype)).sample.float()
      parts.append(((decoded + 1.0) / 2.0).clamp(0.0, 1.0).to(latents.device))
    return torch.cat(parts)


def load_autoencoder(latent, device, batch_size=64):
  """The ``Autoencoder`` of ``latent.autoencoder`` on ``device`` (float32)."""
  autoencoder_class = require_diffusers()
  source, kwargs = _location(latent)
  try:
    vae = autoencoder_class.from_pretrained(source, torch_dtype=torch.float32, low_cpu_mem_usage=False, **kwargs)
  except (OSError, ValueError) as error:
    raise _missing(latent, error) from error
  return Autoencoder(vae.to(device), batch_size)


def latent_to_model(latents, scale, shift):
  """z -> the flow's data x = (z - shift) * scale."""
  return (latents - shift) * scale


def model_to_latent(x, scale, shift):
  """The flow's x -> z = x / scale + shift (the inverse of ``latent_to_model``)."""
  return x / scale + shift
