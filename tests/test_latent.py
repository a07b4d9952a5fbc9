"""Latent-space training (datasets/latents.py, models/autoencoder.py) with a small randomly initialised
AutoencoderKL built here from a config and saved as diffusers saves one (the real loading code, small data): the
shapes come from the autoencoder, the cache holds its moments, is reused, renewed for another autoencoder or source,
resumed after a kill; training draws views and posterior samples from the data generator and resumes exactly;
grids, the eval sweep and reflow pairs work on latents; missing weights or diffusers are one clear error."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import checkpoints
import datasets
import run_lib
from datasets import image_folder, latents
from models import autoencoder as autoencoders
from models import create_model, flow_shape
from tests.helpers import tiny_digits_config

SCALE, SHIFT = 0.5, 0.1  # The tiny autoencoder's scaling_factor and shift_factor.


def save_tiny_autoencoder(folder, seed=0):
  """A 1-channel AutoencoderKL of two blocks (16 x 16 digits -> 4 x 8 x 8 latents), saved into ``folder``."""
  torch.manual_seed(seed)
  vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=('DownEncoderBlock2D',) * 2,
                      up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), layers_per_block=1,
                      latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=SCALE, shift_factor=SHIFT)
  vae.save_pretrained(str(folder))
  return vae.eval()


@pytest.fixture(scope='module')
def autoencoder_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('tiny_vae')
  save_tiny_autoencoder(folder)
  return folder


def latent_config(tmp_path, autoencoder_folder, dit=True, **training):
  config = tiny_digits_config(**training)
  config.latent.autoencoder = str(autoencoder_folder)
  config.latent.cache_dtype = 'float32'
  config.data.root = str(tmp_path / 'data')
  if dit:
    m = config.model
    m.name, m.patch_size, m.dit_size, m.dit_depth, m.dit_hidden_size, m.dit_num_heads = 'dit', 2, 'custom', 1, 32, 2
  return config


def test_the_flow_and_its_network_live_in_the_latent_shape_of_the_autoencoder(tmp_path, autoencoder_folder):
  config = latent_config(tmp_path, autoencoder_folder)
  assert flow_shape(config) == (4, 8, 8)
  for dit in (True, False):
    net = create_model(latent_config(tmp_path, autoencoder_folder, dit=dit))
    x = torch.randn(2, 4, 8, 8)
    assert net(x, torch.rand(2) * 999).shape == (2, 4, 8, 8)
  config.latent.autoencoder = ''
  assert flow_shape(config) == (1, 16, 16)  # Pixel space: the data's shape.
  config = latent_config(tmp_path, autoencoder_folder)
  config.data.image_size = 17
  with pytest.raises(ValueError, match='multiple of the autoencoder.s downsampling factor 2'):
    flow_shape(config)


def test_the_cache_holds_the_posterior_moments_of_every_image_and_of_its_mirror(tmp_path, autoencoder_folder):
  config = latent_config(tmp_path, autoencoder_folder)
  cached = latents.latent_dataset(config, train=True, device=torch.device('cpu'))
  images = datasets.get_dataset(config, train=True)
  assert len(cached) == len(images) and cached.shape[1:] == (2, 2, 4, 8, 8)
  vae = AutoencoderKL.from_pretrained(str(autoencoder_folder)).eval()
  for index in (0, 7, len(images) - 1):
    with torch.no_grad():
      for view, image in enumerate((images[index], images[index].flip(-1))):
        posterior = vae.encode(image[None] * 2 - 1).latent_dist
        torch.testing.assert_close(cached[index][view, 0], posterior.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached[index][view, 1], posterior.logvar[0], atol=1e-5, rtol=1e-5)
  assert not torch.equal(cached[0][0], cached[0][1])  # The mirror image is another encoding.
  held_out = latents.latent_dataset(config, train=False, device=torch.device('cpu'))
  assert held_out.shape[1] == 1 and len(held_out) == len(datasets.get_dataset(config, train=False))  # No flips.


def test_a_later_run_reads_the_cache_and_another_autoencoder_makes_another(tmp_path, autoencoder_folder, monkeypatch):
  config = latent_config(tmp_path, autoencoder_folder)
  first = latents.latent_dataset(config, device=torch.device('cpu')).path

  def no_encoding(self, images):
    raise AssertionError('the cache was encoded again')

  monkeypatch.setattr(autoencoders.Autoencoder, 'encode', no_encoding)
  assert latents.latent_dataset(config, device=torch.device('cpu')).path == first
  monkeypatch.undo()
  other_folder = tmp_path / 'other_vae'
  save_tiny_autoencoder(other_folder, seed=1)  # The same architecture, other weights.
  config.latent.autoencoder = str(other_folder)
  second = latents.latent_dataset(config, device=torch.device('cpu'))
  assert second.path != first and os.path.exists(first)
  assert not np.array_equal(np.load(first), np.load(second.path))


def test_the_source_fingerprint_follows_the_files_and_the_arrays(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  for index in range(3):
    Image.fromarray(np.full((4, 4, 3), 40 * index, np.uint8)).save(folder / f'{index}.png')

  def fingerprint(dataset):
    digest = hashlib.sha256()
    latents.source_fingerprint(dataset, digest)
    return digest.hexdigest()

  before = fingerprint(image_folder.ImageFolder(str(folder), 4))
  assert fingerprint(image_folder.ImageFolder(str(folder), 4)) == before
  Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(folder / '1.png')
  os.utime(folder / '1.png', ns=(1, 1))  # Rewritten: another modification time.
  assert fingerprint(image_folder.ImageFolder(str(folder), 4)) != before
  tensors = datasets.digits.TensorImages(torch.zeros(3, 1, 4, 4))
  changed = datasets.digits.TensorImages(torch.zeros(3, 1, 4, 4).index_fill_(0, torch.tensor([2]), 1.0))
  assert fingerprint(tensors) != fingerprint(changed)


def test_a_killed_encoding_resumes_where_it_stopped_and_gives_the_uninterrupted_cache(
    tmp_path, autoencoder_folder, monkeypatch):
  monkeypatch.setattr(latents, 'ENCODE_CHUNK', 200)
  whole = latent_config(tmp_path / 'whole', autoencoder_folder)
  expected = np.load(latents.latent_dataset(whole, device=torch.device('cpu')).path)
  config = latent_config(tmp_path, autoencoder_folder)
  encode, calls = autoencoders.Autoencoder.encode, []

  def killed_at_the_third_chunk(self, images):
    calls.append(images.shape[0])
    if len(calls) == 1 + 2 * 2 + 1:  # The shape probe, two chunks of two views, then the kill.
      raise KeyboardInterrupt
    return encode(self, images)

  monkeypatch.setattr(autoencoders.Autoencoder, 'encode', killed_at_the_third_chunk)
  with pytest.raises(KeyboardInterrupt):
    latents.latent_dataset(config, device=torch.device('cpu'))
  cache_folder = tmp_path / 'data' / latents.CACHE_FOLDER
  names = sorted(os.listdir(cache_folder))
  assert not [name for name in names if name.endswith('.npy') and '.partial' not in name]  # No finished cache yet.
  progress = json.loads(next((cache_folder / name) for name in names if name.endswith('.progress.json')).read_text())
  assert progress['done'] == 400

  calls.clear()
  monkeypatch.setattr(autoencoders.Autoencoder, 'encode', lambda self, images: calls.append(images.shape[0]) or
                      encode(self, images))
  resumed = latents.latent_dataset(config, device=torch.device('cpu'))
  assert sum(calls[1:]) == 2 * (len(expected) - 400)  # Only the images after the kill, in two views.
  np.testing.assert_array_equal(np.load(resumed.path), expected)
  assert sorted(os.listdir(cache_folder)) == [os.path.basename(resumed.path)]  # Nothing partial left behind.


def test_training_draws_each_rows_view_and_posterior_sample_from_the_global_batch():
  batch, shape = 8, (4, 3, 3)
  moments = torch.zeros(batch, 2, 2, *shape)
  moments[:, 1, 0] = 1.0  # The mirror view's mean is 1, the image's 0.
  moments[:, :, 1] = float(np.log(4.0))  # Posterior std 2.
  held_out = latents.draw_latents(moments, SCALE, SHIFT, augment=False)
  torch.testing.assert_close(held_out, torch.full((batch, *shape), (0.0 - SHIFT) * SCALE))
  generator = torch.Generator().manual_seed(3)
  state = generator.get_state()
  whole = latents.draw_latents(moments, SCALE, SHIFT, generator=generator)
  flips = torch.rand(batch, generator=torch.Generator().manual_seed(3)) < 0.5
  assert 0 < flips.sum() < batch
  generator.set_state(state)
  rows = latents.draw_latents(moments[4:], SCALE, SHIFT, generator=generator, global_batch=batch, rows=slice(4, 8))
  torch.testing.assert_close(rows, whole[4:])  # A process's rows of the global batch's draws.
  latent_values = whole / SCALE + SHIFT  # z = mean + 2 * noise, mean 1 for the flipped rows.
  noise = (latent_values - flips.float().reshape(-1, 1, 1, 1)) / 2
  generator = torch.Generator().manual_seed(3)
  torch.rand(batch, generator=generator)
  torch.testing.assert_close(noise, torch.randn((batch, *shape), generator=generator))
  means_only = latents.draw_latents(moments, SCALE, SHIFT, sample_posterior=False,
                                    generator=torch.Generator().manual_seed(3))
  torch.testing.assert_close(means_only / SCALE + SHIFT, flips.float().reshape(-1, 1, 1, 1).expand(batch, *shape))


def final_weights(workdir):
  state = torch.load(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth'), weights_only=True)
  return state['model']


def test_a_latent_run_trains_decodes_its_grid_and_resumes_exactly(tmp_path, autoencoder_folder):
  config = latent_config(tmp_path, autoencoder_folder, n_iters=4, snapshot_freq=4, snapshot_freq_for_preemption=2)
  run_lib.train(config, str(tmp_path / 'whole'))
  weights = final_weights(tmp_path / 'whole')
  assert weights['module.patch_embedding.weight'].shape[1] == 4  # The DiT took the 4 latent channels.
  grid = Image.open(tmp_path / 'whole' / 'samples' / 'iter_4' / 'sample.png')
  assert grid.size == (2 * (16 + 2) + 2, 2 * (16 + 2) + 2)  # 2 x 2 decoded 16 x 16 digits, torchvision's padding.
  interrupted = latent_config(tmp_path, autoencoder_folder, n_iters=2, snapshot_freq=4, snapshot_freq_for_preemption=2)
  run_lib.train(interrupted, str(tmp_path / 'resumed'))
  run_lib.train(config, str(tmp_path / 'resumed'))
  resumed = final_weights(tmp_path / 'resumed')
  assert weights.keys() == resumed.keys()
  for name in weights:
    torch.testing.assert_close(resumed[name], weights[name], rtol=0, atol=0, msg=name)


def test_the_eval_sweep_and_reflow_pairs_work_on_latents(tmp_path, autoencoder_folder):
  config = latent_config(tmp_path, autoencoder_folder, n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=2)
  workdir = str(tmp_path / 'run')
  run_lib.train(config, workdir)
  e = config.eval
  e.begin_ckpt = e.end_ckpt = 1
  e.enable_sampling, e.enable_loss, e.metrics_backend = True, True, 'digits'
  e.num_samples, e.batch_size = 8, 4
  reports = run_lib.evaluate(config, workdir, 'eval')
  assert len(reports) == 1 and np.isfinite(reports[0]['digit_fd']) and np.isfinite(reports[0]['eval_loss'])
  with np.load(os.path.join(workdir, 'eval', 'ckpt_1', 'round_00000.npz'), allow_pickle=False) as rounds:
    images = rounds['images']
  assert images.shape == (4, 1, 16, 16) and images.dtype == np.uint8 and images.std() > 0  # Decoded digits.

  pairs = config.copy_and_resolve_references()
  r = pairs.reflow
  r.reflow_type, r.last_flow_ckpt = 'generate_data_from_z0', os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth')
  r.data_root, r.total_number_of_samples, r.pairs_per_shard = str(tmp_path / 'pairs'), 8, 8
  run_lib.reflow(pairs, str(tmp_path / 'pairs_work'))
  shard = datasets.reflow_pairs.PairShards(r.data_root, (4, 8, 8), 0)
  assert len(shard) == 8 and shard[0].x0.shape == shard[0].x1.shape == (4, 8, 8)
  student = pairs.copy_and_resolve_references()
  student.reflow.reflow_type = 'train_reflow'
  run_lib.reflow(student, str(tmp_path / 'student'))
  assert checkpoints.snapshot_checkpoint_path(str(tmp_path / 'student'), 1)


def test_missing_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  config = latent_config(tmp_path, 'example-org/a-vae-that-is-not-cached')
  with pytest.raises(FileNotFoundError, match='latent.download=True'):
    flow_shape(config)
  (tmp_path / 'empty').mkdir()
  config.latent.autoencoder = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='config.json and diffusion_pytorch_model.safetensors'):
    autoencoders.load_autoencoder(config.latent, torch.device('cpu'))


def test_without_diffusers_the_error_says_what_to_install(tmp_path, autoencoder_folder, monkeypatch):
  monkeypatch.setitem(sys.modules, 'diffusers', None)
  with pytest.raises(ImportError, match='requirements-latent.txt'):
    flow_shape(latent_config(tmp_path, autoencoder_folder))


@pytest.mark.parametrize('key, value, message', [
    ('data.uniform_dequantization', True, 'uniform_dequantization=False'),
    ('eval.enable_bpd', True, 'enable_bpd=False'),
    ('reflow.reflow_loss', 'lpips_huber', 'reflow_loss=pseudo_huber'),
    ('latent.cache_dtype', 'int8', "'float16', 'float32'"),
])
def test_settings_without_meaning_on_latents_are_clear_errors(tmp_path, autoencoder_folder, key, value, message):
  config = latent_config(tmp_path, autoencoder_folder)
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    latents.check_latent_config(config)


@pytest.mark.parametrize('variant', ['class_conditional', 'meanflow'])
def test_class_conditional_and_meanflow_runs_train_on_latents(tmp_path, autoencoder_folder, variant):
  config = latent_config(tmp_path, autoencoder_folder, n_iters=2, snapshot_freq=2, snapshot_freq_for_preemption=2)
  if variant == 'class_conditional':
    config.model.num_classes, config.sampling.guidance_scale = 10, 2.0
  else:
    config.training.objective, config.model.time_inputs = 'meanflow', 2
    config.sampling.use_ode_sampler, config.sampling.sample_N = 'mean_flow', 1
  run_lib.train(config, str(tmp_path / 'run'))
  if variant == 'class_conditional':  # The cache keeps each image's label.
    cached = latents.latent_dataset(config, device=torch.device('cpu'))
    images = datasets.get_dataset(config)
    assert [cached[i][1] for i in (0, 5, 100)] == [images[i][1] for i in (0, 5, 100)]
  weights = final_weights(tmp_path / 'run')
  assert any(('label_embedding' if variant == 'class_conditional' else 'interval_embedding') in key for key in weights)
  assert os.path.exists(tmp_path / 'run' / 'samples' / 'iter_2' / 'sample.png')
