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
  with env.begin(write=True) as transaction:
    for i in range(5):
      buffer = io.BytesIO()
      Image.fromarray(rng.randint(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, format='webp')
      transaction.put(f'{i:05d}'.encode(), buffer.getvalue())
  env.close()
  config = get_default_configs()
  config.data.root, config.data.category, config.data.image_size = str(tmp_path), 'bedroom', 32
  dataset = datasets.get_dataset(config)
  assert len(dataset) == 5 and dataset[3].shape == (3, 32, 32)
  batch = next(datasets.endless_batches(dataset, 4, seed=0, num_workers=2))  # LMDB handles survive workers.
  assert batch.shape == (4, 3, 32, 32)
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


def test_published_checkpoint_resumes_training(published_ncsnpp_run):
  config, published, tmp_path = published_ncsnpp_run
  workdir = tmp_path / 'resume'
  (workdir / 'checkpoints-meta').mkdir(parents=True)
  shutil.copy(published, workdir / 'checkpoints-meta' / 'checkpoint.pth')
  state = run_lib.train(config, str(workdir))
  assert state['step'] == 3  # Resumed at the published step 2, one more update.
  assert state['ema'].num_updates == 3


def test_published_checkpoint_is_evaluated_and_used_as_a_reflow_teacher(published_ncsnpp_run):
  config, published, tmp_path = published_ncsnpp_run
  workdir = tmp_path / 'eval'
  (workdir / 'checkpoints').mkdir(parents=True)
  shutil.copy(published, workdir / 'checkpoints' / 'checkpoint_1.pth')
  config.eval.enable_loss = True
  config.eval.batch_size = 4
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  run_lib.evaluate(config, str(workdir), 'eval')
  report = json.loads((workdir / 'eval' / 'report_1.json').read_text())
  assert report['step'] == 2 and np.isfinite(report['eval_loss'])

  config.reflow.last_flow_ckpt = published
  config.reflow.data_root = str(tmp_path / 'pairs')
  config.reflow.total_number_of_samples = 3
  config.reflow.pairs_per_shard = 2
  manifest = run_lib.generate_reflow_pairs(config, str(tmp_path / 'gen'))
  assert manifest['count'] == 3


def test_a_published_checkpoint_of_another_architecture_names_keys_and_config(published_ncsnpp_run):
  config, published, tmp_path = published_ncsnpp_run
  config.model.num_res_blocks = 2
  state = run_lib.build_training_state(config, torch.device('cpu'))
  with pytest.raises(ValueError, match=r'Missing keys: .*Unexpected keys: .*The config expects model.name=ncsnpp, '
                                       r'.*num_res_blocks=2'):
    checkpoints.load_checkpoint(published, state, architecture=run_lib.model_config_summary(config))
