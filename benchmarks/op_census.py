"""Operators dispatched and host reads made by one training update, on any device (the CPU proxies of GPU cost).

On a GPU every dispatched operator launches at least one kernel (views launch none) and every host read stalls the
CPU until the device catches up; a small network is bound by both. ``speed.dispatch_census.DispatchCensus``
counts them around one update (after a warm-up update) of the digits demo model or the CIFAR-10 DDPM++, with the
settings before the GPU-first step (fp32, unfused Adam) as the baseline and then today's defaults.

  python benchmarks/op_census.py                           # digits demo model, batch 64, CPU
  python benchmarks/op_census.py --model ddpmpp --batch 8
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import run_lib  # noqa: E402
from configs.rectified_flow.cifar10_rf_gaussian_ddpmpp import get_config as ddpmpp_config  # noqa: E402
from configs.rectified_flow.digits_rf_gaussian_ddpmpp_demo import get_config as digits_config  # noqa: E402
from datasets import Batch  # noqa: E402
from speed.dispatch_census import DispatchCensus  # noqa: E402
from speed.precision import resolve_precision  # noqa: E402

MODELS = {'digits': digits_config, 'ddpmpp': ddpmpp_config}
VIEW_OPERATORS = ('aten::detach', 'aten::view', 'aten::_unsafe_view', 'aten::permute', 'aten::unsqueeze',
                  'aten::squeeze', 'aten::t', 'aten::transpose', 'aten::expand', 'aten::slice', 'aten::select',
                  'aten::as_strided', 'aten::alias', 'aten::reshape')
SETTINGS = (('before: fp32, unfused Adam', {'precision': 'fp32', 'fused': False}),
            ('fp32, fused Adam', {'precision': 'fp32', 'fused': True}),
            ('default (precision auto, fused Adam)', {'precision': 'auto', 'fused': True}))


def census_of_one_update(model, batch, device_setting, precision, fused):
  config = MODELS[model]()
  config.device, config.training.batch_size = device_setting, batch
  config.training.precision, config.optim.fused = precision, fused
  device = run_lib.select_device(config)
  run_lib.configure_backends(config, device)
  torch.manual_seed(0)
  state = losses.build_training_state(config, device)
  flow = losses.build_rectified_flow(config, state['model'])
  step = losses.get_step_fn(config, losses.get_loss_fn(config, flow), list(state['model'].parameters()),
                            state['optimizer'], state['ema'], train=True, device=device,
                            generator=torch.Generator(device).manual_seed(0))
  size, channels = config.data.image_size, config.data.num_channels
  x1 = torch.rand(batch, channels, size, size, device=device) * 2 - 1
  step(state, [Batch(None, x1, slice(None))])
  with DispatchCensus() as census:
    step(state, [Batch(None, x1, slice(None))])
  return census, resolve_precision(config, device)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', choices=sorted(MODELS), default='digits')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--device', default='auto')
  args = parser.parse_args()
  print(f'one training update of the {args.model} model, batch {args.batch}, device {args.device}')
  print(f'{"setting":<40}{"precision":>10}{"operators":>11}{"non-view":>10}{"host reads":>12}  most frequent')
  for label, setting in SETTINGS:
    census, precision = census_of_one_update(args.model, args.batch, args.device, **setting)
    views = sum(count for name, count in census.operators.items() if name.split('.')[0] in VIEW_OPERATORS)
    top = ', '.join(f'{name.replace("aten::", "")} {count}' for name, count in census.operators.most_common(3))
    print(f'{label:<40}{precision:>10}{census.total:>11}{census.total - views:>10}{census.total_host_reads:>12}  {top}',
          flush=True)


if __name__ == '__main__':
  main()
