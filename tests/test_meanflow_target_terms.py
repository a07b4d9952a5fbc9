"""examples/meanflow_target_terms.py at a toy size: it trains a MeanFlow of the digits per time scale and measures
the target's terms at the initial network and each checkpoint."""
import json

from examples import meanflow_target_terms


def test_the_time_derivative_of_a_network_of_999_t_outgrows_that_of_raw_times(tmp_path):
  """The same seed, data and updates, only the time scale differs: at initialisation the output (and all its
  derivatives) is near zero on both scales, alike; after 4 updates the 999 network's du/dt term is more than 100
  times that of the raw-time one (the chain rule through t * 999), while u and the image term stay alike."""
  results = meanflow_target_terms.main(['--workdir', str(tmp_path), '--small', '--updates', '4', '--every', '2',
                                        '--measure', '16', '--batch', '8'])
  assert list(results) == ['999', '1'] and [step for step, _ in results['1']] == [0, 2, 4]
  (_, start_999), *_, (_, end_999) = results['999']
  (_, start_1), *_, (_, end_1) = results['1']
  for name in ('u', 'v', 'spatial'):
    assert abs(start_999[name] - start_1[name]) <= 1e-3 * start_1[name]
  assert end_999['temporal'] > 100 * end_1['temporal'] > 0
  assert 0.5 < end_999['u'] / end_1['u'] < 2 and 0.5 < end_999['spatial'] / end_1['spatial'] < 2
  assert json.loads((tmp_path / 'target_terms.json').read_text()) == json.loads(json.dumps(results))
  table = (tmp_path / 'target_terms.md').read_text().splitlines()
  assert table[0] == '| time scale | update | u | v | spatial | temporal | target-u |' and len(table) == 2 + 6
