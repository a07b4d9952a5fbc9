"""NCSN++ family: image folders, LSUN LMDB, and published-format checkpoints for resume, evaluation and reflow."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import datasets
import losses
import models
import reflow
import run_lib
from configs.default_lsun_configs import get_default_configs
from tests.reference_data import reference_path


def write_images(folder, count, size=(40, 24), formats=('png', 'jpg', 'webp')):
  rng = np.random.RandomState(0)
  for i in range(count):
    sub = folder / f'part{i % 2}' / 'deeper'
    sub.mkdir(parents=True, exist_ok=True)
    array = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(sub / f'img{i}.{formats[i % len(formats)]}')


def folder_config(root, image_size=32):
  config = get_default_configs()
  config.device = 'cpu'  # Parity with the published fixtures is checked on the CPU, on every machine.
  config.data.dataset = 'CelebA-HQ-Pytorch'
  config.data.root = str(root)
  config.data.image_size = image_size
  return config


def test_image_folder_is_recursive_and_centre_crops(tmp_path):
  write_images(tmp_path, 6)
  (tmp_path / 'notes.txt').write_text('not an image')
  dataset = datasets.get_dataset(folder_config(tmp_path))
  assert len(dataset) == 6
  image = dataset[0]
  assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 1
  # Resize of the shorter side then centre crop: a 40x24 image becomes 53x32, cropped to its middle 32 columns.
  source = Image.open(dataset.files[0]).convert('RGB')
  expected = torch.from_numpy(np.array(source.resize((53, 32), Image.BICUBIC))[:, 10:42]).permute(2, 0, 1) / 255
  assert (image - expected).abs().mean() < 0.03


def test_image_folder_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    datasets.get_dataset(folder_config(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='holds no images'):
    datasets.get_dataset(folder_config(tmp_path / 'empty'))
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'a.png').write_bytes(b'not a png')
  dataset = datasets.get_dataset(folder_config(tmp_path / 'broken'))
  with pytest.raises(ValueError, match="Cannot read the image .*a.png.*Remove or replace"):
    dataset[0]


def test_lsun_reads_its_lmdb_export(tmp_path):
  import lmdb

  path = tmp_path / 'bedroom_train_lmdb'
  env = lmdb.open(str(path), map_size=1 << 24)
  rng = np.random.RandomState(0)
  written = [rng.randint(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)]  # (H, W, C)
  with env.begin(write=True) as transaction:
    for i, array in enumerate(written):
      buffer = io.BytesIO()
      Image.fromarray(array).save(buffer, format='webp', lossless=True)  # Decodes to exactly these pixels.
      transaction.put(f'{i:05d}'.encode(), buffer.getvalue())
  env.close()
  config = get_default_configs()
  config.data.root, config.data.category, config.data.image_size = str(tmp_path), 'bedroom', 32
  dataset = datasets.get_dataset(config)
  assert len(dataset) == 5
  # Shorter side 48 -> 32 with PIL's bicubic: 64 x 48 becomes int(64 * 32 / 48) = 42 x 32; the centre crop keeps
  # columns round((42 - 32) / 2) = 5 .. 36. Then (C, H, W) in [0, 1].
  expected = torch.stack([
      torch.from_numpy(np.array(Image.fromarray(array).resize((42, 32), Image.BICUBIC))[:, 5:37]).permute(2, 0, 1)
      .float() / 255 for array in written])  # (5, 3, 32, 32)
  for i in range(5):  # Record i of the LMDB (keys in order) is item i.
    torch.testing.assert_close(dataset[i], expected[i], atol=1e-6, rtol=0)
  batch = next(datasets.endless_batches(dataset, 4, seed=0, num_workers=2)).x1  # LMDB handles survive workers.
  assert batch.shape == (4, 3, 32, 32)
  for image in batch:  # Workers read the same pixels: each image of the batch is one of the records.
    assert min((image - other).abs().max().item() for other in expected) < 1e-6
  config.data.category = 'church_outdoor'
  with pytest.raises(FileNotFoundError, match='church_outdoor_train_lmdb'):
    datasets.get_dataset(config)


@pytest.fixture()
def published_ncsnpp_run(tmp_path):
  """A config matching the ncsnpp_tiny fixture, an image folder of 32x32 images, and the published checkpoint."""
  with open(reference_path('official_fixtures', 'ncsnpp_tiny_config.json')) as handle:
    spec = json.load(handle)
  write_images(tmp_path / 'images', 8, size=(32, 32))
  config = folder_config(tmp_path / 'images')
  for key, value in spec['model'].items():
    if key in config.model and key not in ('ema_rate',):
      config.model[key] = tuple(value) if isinstance(value, list) else value
  config.data.centered = spec['centered']
  config.training.batch_size = 4
  config.training.n_iters = 3
  config.training.snapshot_freq = 3
  config.training.snapshot_freq_for_preemption = 1
  config.training.log_freq = 1
  config.training.eval_freq = 1
  config.sampling.use_ode_sampler = 'euler'
  config.sampling.sample_N = 2
  config.sampling.snapshot_batch_size = 2
  config.data.num_workers = 0
  return config, reference_path('official_fixtures', 'ncsnpp_tiny_official_checkpoint.pth'), tmp_path


def ema_network(config, checkpoint):
  """The network of a published checkpoint with its EMA weights, loaded here with plain torch: the ``model`` state
  dict without its ``module.`` prefix, then the EMA shadows copied over the trainable parameters in their order."""
  net = models.create_model(config)
  net.load_state_dict({key[len('module.'):]: value for key, value in checkpoint['model'].items()}, strict=True)
  trainable = [p for p in net.parameters() if p.requires_grad]
  with torch.no_grad():
    for param, shadow in zip(trainable, checkpoint['ema']['shadow_params'], strict=True):
      param.copy_(shadow)
  return net.eval()


def test_published_checkpoint_resumes_training(published_ncsnpp_run):
  config, published, tmp_path = published_ncsnpp_run
  saved = torch.load(published, map_location='cpu', weights_only=True)
  workdir = tmp_path / 'resume'
  (workdir / 'checkpoints-meta').mkdir(parents=True)
  shutil.copy(published, workdir / 'checkpoints-meta' / 'checkpoint.pth')
  # Resumed at the published step 2 with n_iters = 2: no update, so the state is what was loaded.
  config.training.n_iters = saved['step']
  state = run_lib.train(config, str(workdir))
  assert state['step'] == 2
  weights = state['model'].state_dict()
  assert sorted('module.' + key for key in weights) == sorted(saved['model'])
  for key, value in weights.items():
    assert torch.equal(value, saved['model']['module.' + key]), key
  ema = state['ema']
  assert ema.num_updates == saved['ema']['num_updates'] == 2 and ema.decay == saved['ema']['decay']
  for shadow, published_shadow in zip(ema.shadow_params, saved['ema']['shadow_params'], strict=True):
    assert torch.equal(shadow, published_shadow)
  moments = state['optimizer'].state_dict()['state']
  assert moments.keys() == saved['optimizer']['state'].keys()
  for index, published_moments in saved['optimizer']['state'].items():
    for name, value in published_moments.items():  # step, exp_avg, exp_avg_sq
      assert torch.equal(moments[index][name].to(value.dtype), value), (index, name)

  # One more update from there: EMA update 3 moves each shadow by 1 - d towards the new weights, with
  # d = min(decay, (1 + 3) / (10 + 3)), from the published shadows; the weights move by about the warm-up lr.
  config.training.n_iters = 3
  state = run_lib.train(config, str(workdir))
  assert state['step'] == 3 and state['ema'].num_updates == 3
  decay = min(saved['ema']['decay'], 4 / 13)
  trainable = [p.detach() for p in state['model'].parameters() if p.requires_grad]
  for shadow, param, published_shadow in zip(state['ema'].shadow_params, trainable, saved['ema']['shadow_params'],
                                              strict=True):
    torch.testing.assert_close(shadow, decay * published_shadow + (1 - decay) * param, atol=1e-6, rtol=1e-5)
  lr = config.optim.lr * 2 / config.optim.warmup  # Update 2 (0-based) of the linear warm-up.
  for key, value in state['model'].state_dict().items():
    assert (value - saved['model']['module.' + key]).abs().max() <= 100 * lr, key


def test_published_checkpoint_is_evaluated_and_used_as_a_reflow_teacher(published_ncsnpp_run):
  config, published, tmp_path = published_ncsnpp_run
  saved = torch.load(published, map_location='cpu', weights_only=True)
  net = ema_network(config, saved)
  eps, noise_std = config.training.time_eps, config.sampling.init_noise_scale
  workdir = tmp_path / 'eval'
  (workdir / 'checkpoints').mkdir(parents=True)
  shutil.copy(published, workdir / 'checkpoints' / 'checkpoint_1.pth')
  config.eval.enable_loss = True
  config.eval.batch_size = 4
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  run_lib.evaluate(config, str(workdir), 'eval')
  report = json.loads((workdir / 'eval' / 'report_1.json').read_text())
  assert report['step'] == 2
  # The held-out loss on the EMA weights: the 8 images in order, in batches of 4, each batch drawing its noise and
  # then its times t ~ U[eps, 1] from one generator seeded with config.seed; the per-sample mean squared error of
  # v(x_t, t * 999) against x1 - x0, averaged over the images.
  assert config.data.centered
  images = torch.stack([datasets.get_dataset(config, train=False)[i] for i in range(8)]) * 2 - 1  # (8, 3, 32, 32)
  generator = torch.Generator().manual_seed(config.seed)
  total = 0.0
  with torch.no_grad():
    for x1 in images.split(4):
      x0 = torch.randn(x1.shape, generator=generator) * noise_std
      t = torch.rand(4, generator=generator) * (1 - eps) + eps
      x_t = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
      total += (net(x_t, t * 999) - (x1 - x0)).square().flatten(1).mean(1).sum().item()
  # Float32 round-off apart. The weights barely enter here: at most of these times the network's output is ~1e-3
  # (scale_by_sigma at t * 999), so the EMA weights are checked through the pairs below.
  assert report['eval_loss'] == pytest.approx(total / 8, rel=1e-6)

  config.reflow.last_flow_ckpt = published
  config.reflow.data_root = str(tmp_path / 'pairs')
  config.reflow.total_number_of_samples = 3
  config.reflow.pairs_per_shard = 2
  manifest = reflow.generate_reflow_pairs(config, str(tmp_path / 'gen'))
  assert manifest['count'] == 3
  # The pairs are the published Euler sampler of the EMA weights, solved here from the z0 stored in the shards:
  # N steps of size 1/N at t_i = eps + i (1 - eps) / N, the network seeing t_i * 999.
  folder = tmp_path / 'pairs' / f'seed_{config.seed}'
  shards = [np.load(folder / f'shard_{index:06d}.npy') for index in range(2)]  # (2, 2 | 1, C, H, W) each
  z0, z1 = (torch.from_numpy(np.concatenate([shard[k] for shard in shards])) for k in range(2))
  steps = config.sampling.sample_N
  x = z0.clone()
  with torch.no_grad():
    for i in range(steps):
      t = torch.full((3,), eps + i / steps * (1 - eps))
      x = x + net(x, t * 999) * (1 / steps)
  torch.testing.assert_close(z1, x, atol=1e-5, rtol=0)


def test_a_published_checkpoint_of_another_architecture_names_keys_and_config(published_ncsnpp_run):
  config, published, tmp_path = published_ncsnpp_run
  config.model.num_res_blocks = 2
  state = losses.build_training_state(config, torch.device('cpu'))
  with pytest.raises(ValueError, match=r'Missing keys: .*Unexpected keys: .*The config expects model.name=ncsnpp, '
                                       r'.*num_res_blocks=2'):
    checkpoints.load_checkpoint(published, state, architecture=models.model_config_summary(config))
