"""The ``device`` setting (``config.device``, ``main.py --device``): what 'auto', 'cpu', 'cuda' and 'cuda:N' choose in
one process and under torchrun, its errors, and a CPU run recorded as such. CUDA itself is exercised in test_cuda.py."""
import json
import subprocess

import pytest
import torch

import distributed
import run_lib
from tests import fault_injection
from tests.helpers import tiny_digits_config

TORCHRUN_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')


@pytest.fixture()
def machine(monkeypatch):
  """``machine(gpus, rank=None, world=None, local_rank=None)`` makes this process see ``gpus`` CUDA devices (0: no
  CUDA) and, with ``rank``, the environment torchrun gives a process; nothing here touches a real GPU."""
  monkeypatch.setattr(distributed, '_device', None)  # Restored afterwards: no choice leaks into other tests.

  def set_machine(gpus, rank=None, world=None, local_rank=None):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: gpus)
    for name in TORCHRUN_VARIABLES:
      monkeypatch.delenv(name, raising=False)
    if rank is not None:
      monkeypatch.setenv('RANK', str(rank))
      monkeypatch.setenv('WORLD_SIZE', str(world))
      monkeypatch.setenv('LOCAL_RANK', str(local_rank))

  return set_machine


# ---------------------------------------------------------------------------------------------------------------
# distributed.resolve_device.

def test_auto_is_the_cpu_without_cuda(machine):
  machine(gpus=0)
  assert distributed.resolve_device('auto') == torch.device('cpu')
  assert distributed.resolve_device() == torch.device('cpu')  # 'auto' is the default.
  machine(gpus=0, rank=3, world=4, local_rank=1)
  assert distributed.resolve_device('auto') == torch.device('cpu')


def test_auto_and_cuda_take_the_local_rank_gpu(machine):
  machine(gpus=4)
  assert distributed.resolve_device('auto') == torch.device('cuda', 0)
  assert distributed.resolve_device('cuda') == torch.device('cuda', 0)
  machine(gpus=4, rank=6, world=8, local_rank=2)  # Process 6 of 8, the third on its node.
  assert distributed.resolve_device('auto') == torch.device('cuda', 2)
  assert distributed.resolve_device('cuda') == torch.device('cuda', 2)


def test_local_rank_without_torchrun_is_ignored(machine, monkeypatch):
  """A LOCAL_RANK left in the shell of a single process (no RANK, WORLD_SIZE) does not move it off GPU 0."""
  machine(gpus=4)
  monkeypatch.setenv('LOCAL_RANK', '3')
  assert distributed.resolve_device('auto') == torch.device('cuda', 0)


@pytest.mark.parametrize('spelling', ['cpu', 'CPU', ' cpu '])
def test_cpu_is_the_cpu_on_a_gpu_machine(machine, spelling):
  machine(gpus=2)
  assert distributed.resolve_device(spelling) == torch.device('cpu')
  machine(gpus=2, rank=1, world=2, local_rank=1)
  assert distributed.resolve_device(spelling) == torch.device('cpu')


def test_cuda_n_names_one_gpu_of_a_single_process(machine):
  machine(gpus=2)
  assert distributed.resolve_device('cuda:1') == torch.device('cuda', 1)
  assert distributed.resolve_device('cuda:0') == torch.device('cuda', 0)
  with pytest.raises(ValueError, match=r"device='cuda:2': this machine has 2 visible GPU\(s\) \(CUDA_VISIBLE_DEVICES="):
    distributed.resolve_device('cuda:2')
  machine(gpus=2, rank=0, world=1, local_rank=0)  # torchrun with one process: still one GPU for one process.
  assert distributed.resolve_device('cuda:1') == torch.device('cuda', 1)


def test_cuda_n_under_several_torchrun_processes_is_an_error(machine):
  machine(gpus=2, rank=1, world=2, local_rank=1)
  with pytest.raises(ValueError, match=r"device='cuda:0' names one GPU, but torchrun started 2 processes: use "
                                       r"--device=cuda"):
    distributed.resolve_device('cuda:0')


def test_a_local_rank_beyond_the_visible_gpus_is_an_error(machine):
  machine(gpus=2, rank=3, world=4, local_rank=3)
  with pytest.raises(ValueError, match=r'this machine has 2 visible GPU\(s\)'):
    distributed.resolve_device('cuda')


@pytest.mark.parametrize('setting', ['cuda', 'cuda:0', 'CUDA:1'])
def test_cuda_without_cuda_is_a_clear_error(machine, setting):
  machine(gpus=0)
  with pytest.raises(ValueError) as error:
    distributed.resolve_device(setting)
  message = str(error.value)
  assert 'asks for a GPU, but CUDA is not available to this PyTorch' in message
  assert torch.__version__ in message and '--device=cpu or --device=auto' in message


@pytest.mark.parametrize('setting', ['gpu', 'tpu', '', 'cuda:x', 'cuda:-1', 'cuda:', 'cpu:0', 'mps'])
def test_an_unknown_device_lists_the_valid_ones(machine, setting):
  machine(gpus=1)  # With CUDA present, so that a malformed 'cuda:...' is reported as such.
  with pytest.raises(ValueError, match=r"is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
    distributed.resolve_device(setting)


# ---------------------------------------------------------------------------------------------------------------
# distributed.initialize and run_lib.select_device.

def test_select_device_honours_config_device_and_leaves_cuda_alone_for_the_cpu(machine, monkeypatch):
  """On a GPU machine, device='cpu' selects the CPU without touching CUDA; 'auto' selects (and sets) GPU 0."""
  machine(gpus=1)
  set_devices = []
  monkeypatch.setattr(torch.cuda, 'set_device', set_devices.append)
  config = tiny_digits_config()
  assert config.device == 'cpu'
  assert run_lib.select_device(config) == torch.device('cpu')
  assert distributed.device() == torch.device('cpu') and set_devices == []
  assert not distributed.is_distributed()

  monkeypatch.setattr(distributed, '_device', None)
  config.device = 'auto'
  assert run_lib.select_device(config) == torch.device('cuda', 0)
  assert distributed.device() == torch.device('cuda', 0) and set_devices == [torch.device('cuda', 0)]


def test_device_before_initialize_is_what_auto_would_choose(machine):
  machine(gpus=0)
  assert distributed.device() == torch.device('cpu')
  machine(gpus=2, rank=1, world=2, local_rank=1)
  assert distributed.device() == torch.device('cuda', 1)


# ---------------------------------------------------------------------------------------------------------------
# main.py --device.

def one_update(workdir, *device_flags):
  """``main.py --mode train`` for one update of the tiny digits model, with ``device_flags`` only."""
  command = fault_injection.main_command(workdir, 'train', [*fault_injection.tiny_overrides(1), *device_flags],
                                         device=None)
  return subprocess.run(command, cwd=fault_injection.REPO_ROOT, capture_output=True, text=True, timeout=300)


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error:')]


@pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is available here: --device=cuda is a valid choice '
                                                      '(tests/test_cuda.py runs on it)')
def test_main_with_device_cuda_without_cuda_ends_with_one_error_line(tmp_path):
  result = one_update(tmp_path / 'run', '--device=cuda')
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  [line] = error_lines(result.stderr)
  assert "device='cuda' asks for a GPU, but CUDA is not available" in line and '--device=cpu' in line
  assert not (tmp_path / 'run' / 'config.json').exists()  # Refused before anything was written.


def test_main_with_an_unknown_device_ends_with_one_error_line(tmp_path):
  """The error names the flag's value: --device overrides --config.device."""
  result = one_update(tmp_path / 'run', '--config.device=cpu', '--device=gpu0')
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  [line] = error_lines(result.stderr)
  assert "device='gpu0' is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'" in line


def test_main_with_device_cpu_trains_on_the_cpu_and_records_it(tiny_run):
  """The session's tiny run was started with --device=cpu (also on a machine with a GPU): the log names the CPU as
  the training device, and config.json and every checkpoint's config record the setting."""
  assert 'parameters on cpu;' in (tiny_run.parent / 'run.log').read_text()
  assert json.loads((tiny_run / 'config.json').read_text())['device'] == 'cpu'
  for path in (tiny_run / 'checkpoints' / 'checkpoint_1.pth', *(tiny_run / 'checkpoints-meta').iterdir()):
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    assert json.loads(checkpoint['config'])['device'] == 'cpu', path
