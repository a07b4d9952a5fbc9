"""The samplers reproduce the published sampler outputs on the tiny DDPM++ fixture (EMA weights)."""
import pytest
import torch

import checkpoints
import models
from rectified_flow_pytorch import solvers
from tests.reference_data import reference_path
from tests.test_models import fixture_config


@pytest.fixture(scope='module', params=['ddpmpp_tiny', 'ncsnpp_tiny'])
def ema_velocity(request):
  net = models.create_model(fixture_config(request.param))
  checkpoint = torch.load(reference_path('official_fixtures', f'{request.param}_official_checkpoint.pth'),
                          map_location='cpu', weights_only=False)
  checkpoints.load_network_weights(net, checkpoint['model'])
  ema = models.ExponentialMovingAverage(net.parameters(), decay=0.5)
  ema.load_state_dict(checkpoint['ema'])
  ema.copy_to(net.parameters())
  net.eval()
  io = torch.load(reference_path('official_fixtures', f'{request.param}_io.pt'), map_location='cpu',
                  weights_only=False)
  return models.VelocityField(net), io


def test_euler_matches_the_published_sampler(ema_velocity):
  velocity, io = ema_velocity
  x1, nfe = solvers.euler(velocity, io['sampler_z'], steps=io['euler_N'], t0=1e-3, step_size=1.0 / io['euler_N'])
  assert nfe == io['euler_N']
  torch.testing.assert_close(x1, io['euler_x1'], atol=1e-5, rtol=0)


@pytest.mark.parametrize('state_dtype', [None, torch.float64])
def test_rk45_matches_scipy_solve_ivp(ema_velocity, state_dtype):
  velocity, io = ema_velocity
  x1, nfe = solvers.rk45(velocity, io['sampler_z'], t0=io['rk45_eps'], t1=1.0, rtol=io['rk45_tol'],
                         atol=io['rk45_tol'], state_dtype=state_dtype)
  torch.testing.assert_close(x1, io['rk45_x1'], atol=1e-4, rtol=0)
  assert abs(nfe - io['rk45_nfe']) <= 0.1 * io['rk45_nfe']
  if state_dtype == torch.float64:
    assert nfe == io['rk45_nfe']
