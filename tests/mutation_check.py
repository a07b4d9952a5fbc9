"""Mutation check: seed known faults into copies of the tree and show that the suite's tests catch each one.

    python -m tests.mutation_check             # every fault (about 20-30 minutes on 2 CPU cores)
    python -m tests.mutation_check --list      # the faults and the tests run against each
    python -m tests.mutation_check --only fid_against_itself,grad_clip_removed

For each fault the tracked files are copied into a temporary folder, one exact text replacement is applied to one
file (the fault; the text must occur exactly once, so a fault that no longer applies is an error, never a silent
pass), and the tests named for that fault run there. A fault is *caught* when at least one of them fails; one that
survives is a finding about the suite, reported as such (exit code 1). Before the faults, the same tests run on an
unchanged copy and must pass: a test that fails anyway would catch every fault and prove nothing.

Not part of ``make test`` (each fault reruns tests); ``make mutation-check`` runs it.
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Fault = collections.namedtuple('Fault', 'name file old new tests why')

FAULTS = [
    # The faults named by the issue "Every test can fail", each with the tests written to catch it.
    Fault('fid_against_itself', 'evaluation.py',
          "report['fid'] = frechet_distance(mu, sigma, reference['mu'], reference['sigma'])",
          "report['fid'] = frechet_distance(*[reference['mu'], reference['sigma']] * 2)",
          ['tests/test_evaluation.py', '-k', 'eval_sweep_writes'], 'FID of the reference statistics with themselves'),
    Fault('bpd_without_8_bit_offset', 'evaluation.py',
          'offset = 7.0 if config.data.centered else 8.0', 'offset = 0.0',
          ['tests/test_evaluation.py', '-k', 'bits_per_dim'], 'bits/dim without the offset of the 8-bit range'),
    Fault('stats_written_as_zeros', 'run_lib.py',
          'evaluation.save_reference_statistics(config.eval.stats_path, pool_3)',
          'evaluation.save_reference_statistics(config.eval.stats_path, pool_3 * 0)',
          ['tests/test_evaluation.py', '-k', 'stats_mode'], '--mode stats writes zero features'),
    Fault('grad_clip_removed', 'losses.py',
          "max_norm = config.optim.grad_clip if config.optim.grad_clip >= 0 else float('inf')",
          "max_norm = float('inf')",
          ['tests/test_fast_step.py', 'tests/test_training_parity.py', '-k', 'grad_clip or parity'],
          'optim.grad_clip ignored'),
    Fault('mse_summed_over_pixels', 'rectified_flow_pytorch/flow_math.py',
          "  if reduction == 'mean':\n    return squared.mean(dim=1)",
          "  if reduction == 'mean':\n    return squared.sum(dim=1)",
          ['tests/test_flow_math.py', '-k', 'mse'], 'the per-sample MSE summed instead of averaged'),
    Fault('precision_auto_always_fp32', 'speed/precision.py',
          "return 'bf16' if device.type == 'cpu' and native_bf16(device) else 'fp32'", "return 'fp32'",
          ['tests/test_fast_step.py', '-k', 'precision_auto'], "training.precision='auto' never picks bf16"),
    Fault('captured_lr_saved_rounded', 'checkpoints.py',
          "group['lr'] = float(group['lr']) if scheduled_lr is None else scheduled_lr",
          "group['lr'] = float(group['lr'])",
          ['tests/test_fast_step.py', '-k', 'captured_optimizer'], "a graph-captured run saves the float32 lr"),
    Fault('ema_shadows_not_loaded', 'models/ema.py', 'mine.copy_(theirs)', 'pass',
          ['tests/test_high_resolution.py', '-k', 'resumes_training'], "a checkpoint's EMA shadows ignored on load"),
    Fault('teacher_raw_weights', 'reflow.py',
          "  teacher['ema'].copy_to(teacher['model'].parameters())\n  net = teacher['model']",
          "  net = teacher['model']",
          ['tests/test_high_resolution.py', '-k', 'reflow_teacher'], 'pairs from the raw instead of the EMA weights'),
    Fault('teacher_unguided', 'rectified_flow_pytorch/rectified_flow.py',
          "'guidance_scale': self.teacher_guidance_scale,", "'guidance_scale': 1.0,",
          ['tests/test_conditional.py', '-k', 'keeps_the_labels'], "Reflow's teacher guidance ignored"),
    Fault('config_key_unread', 'sampling.py',
          'config.sampling.precision, config.sampling.cuda_graph', 'config.sampling.precision, True',
          ['tests/test_configs.py', '-k', 'every_config_key'], 'sampling.cuda_graph never read'),
    Fault('lsun_reads_one_image', 'datasets/image_folder.py',
          'transaction.get(self.keys[index])', 'transaction.get(self.keys[0])',
          ['tests/test_high_resolution.py', '-k', 'lsun'], 'the LSUN reader returns its first image for every index'),
    Fault('reflow_teacher_is_the_student', 'rectified_flow_pytorch/rectified_flow.py',
          'teacher = self.frozen_model', 'teacher = self.model',
          ['tests/test_library.py', '-k', 'seed_snippet'], "Reflow's pairs from the student, not its frozen copy"),
    # The README's promises that nothing tested before.
    Fault('second_ctrl_c_ignored', 'interruption.py',
          'if self.signum == signal.SIGINT and signum == signal.SIGINT:',
          'if False and self.signum == signal.SIGINT and signum == signal.SIGINT:',
          ['tests/test_reliability.py', '-k', 'second_ctrl_c'], 'a second Ctrl-C waits like the first'),
    Fault('sigterm_not_agreed_across_ranks', 'run_lib.py',
          'signum = distributed.all_reduce_max(stop.signum or 0)', 'signum = stop.signum or 0',
          ['tests/test_distributed.py', '-k', 'sigterm_to_one'], 'torchrun processes stop after different updates'),
    Fault('nonfinite_gradient_applied', 'losses.py',
          'finite = torch.isfinite(loss) & torch.isfinite(grad_norm)', 'finite = torch.isfinite(loss)',
          ['tests/test_reliability.py', '-k', 'non_finite_gradient'], 'an update with an inf gradient norm applied'),
    Fault('stochastic_euler_noise_scale', 'rectified_flow_pytorch/solvers.py',
          'sigma_t * math.sqrt(dt) * next(noises)', 'sigma_t * dt * next(noises)',
          ['tests/test_samplers.py', '-k', 'stochastic'], 'the stochastic Euler noise scaled by dt, not sqrt(dt)'),
    Fault('eval_folder_ignores_checkpoint', 'run_lib.py',
          "manifest = {'checkpoint_sha256': sha256, 'seed': config.seed,",
          "manifest = {'seed': config.seed,",
          ['tests/test_evaluation.py', '-k', 'eval_sweep_writes'], 'eval rounds of another checkpoint mixed in'),
    Fault('lpips_l2_half_weight', 'losses.py',
          'loss = loss + flow_math.per_sample_squared_error', 'loss = loss + 0.5 * flow_math.per_sample_squared_error',
          ['tests/test_reflow.py', '-k', 'lpips_losses'], "reflow_loss='lpips+l2' with half the l2 term"),
    Fault('t1_schedule_off', 'losses.py',
          'torch.ones(batch_size, device=device)', 'torch.full((batch_size,), 0.5, device=device)',
          ['tests/test_reflow.py', '-k', 't1_schedule'], "the 't1' schedule trains at t = 0.5"),
    Fault('pair_shards_read_whole', 'datasets/reflow_pairs.py',
          "np.load(path, mmap_mode='r', allow_pickle=False)", 'np.load(path, allow_pickle=False)',
          ['tests/test_reflow.py', '-k', 'memory_mapped'], 'pair shards read whole instead of memory-mapped'),
    Fault('resident_data_limit_ignored', 'datasets/streams.py',
          'if nbytes > data.device_resident_max_gb * 1e9:', 'if False:',
          ['tests/test_fast_step.py', '-k', 'device_resident_max_gb'], 'data.device_resident_max_gb ignored'),
    Fault('compile_ignored', 'run_lib.py', 'if training.compile:', 'if False:',
          ['tests/test_train.py', '-k', 'compile'], 'training.compile ignored'),
    Fault('logged_lr_one_update_ahead', 'run_lib.py',
          'lr = losses.learning_rate(config, step - 1)', 'lr = losses.learning_rate(config, step)',
          ['tests/test_train.py', '-k', 'metrics_hold'], 'metrics.jsonl logs the next update\'s lr'),
    Fault('inception_input_rounded', 'evaluation.py',
          'return (images * 255.0).clamp(0, 255).to(torch.uint8)',
          'return (images * 255.0).round().clamp(0, 255).to(torch.uint8)',
          ['tests/test_evaluation.py', '-k', 'truncated_8_bit'], 'Inception input rounded instead of truncated'),
    # Faults of this check's own choosing.
    Fault('checkpoints_unpickled', 'checkpoints.py',
          'return torch.load(path, map_location=device, weights_only=True)',
          'return torch.load(path, map_location=device, weights_only=False)',
          ['tests/test_checkpoint_safety.py'], 'checkpoints opened by full unpickling'),
    Fault('log_file_empty', 'main.py',
          'logging.getLogger().addHandler(handler)', 'absl_logging.get_absl_logger().addHandler(handler)',
          ['tests/test_train.py', '-k', 'main_trains'], 'stdout.txt receives none of the framework\'s records'),
    Fault('network_time_scale_1000', 'models/velocity.py',
          'NETWORK_TIME_SCALE = 999.0', 'NETWORK_TIME_SCALE = 1000.0',
          ['tests/test_models.py'], 'the network time input t * 1000 instead of the published t * 999'),
    Fault('ema_without_warmup', 'models/ema.py',
          'decay = torch.minimum(decay, (1.0 + count) / (10.0 + count))', 'decay = decay',
          ['tests/test_training_parity.py'], 'EMA decay without its (1 + n) / (10 + n) ramp'),
    Fault('warmup_off_by_one', 'losses.py',
          'return config.optim.lr * min(step / warmup, 1.0) if warmup > 0 else config.optim.lr',
          'return config.optim.lr * min((step + 1) / warmup, 1.0) if warmup > 0 else config.optim.lr',
          ['tests/test_training_parity.py'], 'learning-rate warm-up one update ahead'),
    Fault('adam_beta2_0_99', 'losses.py', 'betas=(optim.beta1, 0.999)', 'betas=(optim.beta1, 0.99)',
          ['tests/test_training_parity.py'], "Adam's beta2 0.99 instead of the published 0.999"),
    # MeanFlow in the framework (training.objective = 'meanflow').
    Fault('meanflow_bypasses_ddp', 'run_lib.py',
          'train_flow = losses.build_flow(config, train_module)', 'train_flow = losses.build_flow(config, net)',
          ['tests/test_distributed.py', '-k', 'meanflow'], "MeanFlow's forward-mode pass around DDP, not through it"),
    Fault('meanflow_time_tangent_zero', 'rectified_flow_pytorch/mean_flow.py',
          'forward_ad.make_dual(times, torch.ones_like(times))', 'forward_ad.make_dual(times, torch.zeros_like(times))',
          ['tests/test_mean_flow.py', '-k', 'finite_differences'], 'the tangent (v, 0, 0): d/dt u without its t part'),
    Fault('imf_tangent_is_the_pairs_velocity', 'rectified_flow_pytorch/mean_flow.py',
          'model_velocity.to(x_t.dtype)', 'velocity.detach()',
          ['tests/test_improved_mean_flow.py', '-k', 'finite_differences'],
          "improved MeanFlow's tangent the pair's velocity X1 - X0 (MeanFlow's), not the network's own"),
    Fault('checkpoint_time_scales_unchecked', 'checkpoints.py',
          '  if config is not None:\n    check_time_scales(checkpoint, config, path)\n', '',
          ['tests/test_two_times.py', '-k', 'time_scales'],
          'a checkpoint loads under time scales other than those it was trained with'),
    Fault('mean_flow_sampler_instantaneous', 'sampling.py',
          'end = t_network if step is None else (t_network + step).clamp(max=1.0)', 'end = t_network',
          ['tests/test_meanflow_training.py', '-k', 'sampler'], "the 'mean_flow' sampler jumps with u(z, t, t)"),
    Fault('meanflow_eval_steps_ignored', 'sampling.py',
          '  config.sampling.sample_N = steps\n', '',
          ['tests/test_meanflow_training.py', '-k', 'eval_sweep'], 'every step count of the sweep samples sample_N'),
    Fault('group_norm_bf16_on_the_cpu', 'models/layers.py',
          'if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):', 'if True:',
          ['tests/test_meanflow_training.py', '-k', 'bf16'], "GroupNorm in bf16 under the CPU's autocast"),
    # The DiT backbone (model.name = 'dit').
    Fault('dit_blocks_not_zero_initialised', 'models/dit.py',
          'linear(hidden_size, 6 * hidden_size, nn.init.zeros_)', 'linear(hidden_size, 6 * hidden_size)',
          ['tests/test_dit.py', '-k', 'identity'], "adaLN without its Zero: the blocks' gates start non-zero"),
    Fault('dit_patches_transposed', 'models/dit.py',
          'patches.permute(0, 5, 1, 3, 2, 4)', 'patches.permute(0, 5, 2, 3, 1, 4)',
          ['tests/test_dit.py', '-k', 'patch'], 'unpatchify swaps the patch grid\'s rows and columns'),
    Fault('dit_interval_embedding_not_zero', 'models/dit.py',
          'FrequencyEmbedding(hidden_size, zero_output=True)', 'FrequencyEmbedding(hidden_size)',
          ['tests/test_dit.py', '-k', 'two_time'], 'a fresh two-time DiT is not its one-time counterpart'),
    Fault('dit_fused_attention_under_jvp', 'models/dit.py',
          'if forward_ad.unpack_dual(queries).tangent is None:', 'if True:',
          ['tests/test_dit.py', '-k', 'forward_mode or meanflow'], "SDPA's fused kernels under MeanFlow's JVP"),
    # Latent-space training (issue 24).
    Fault('latent_mirror_view_never_drawn', 'datasets/latents.py',
          'moments[:, 1], chosen)', 'chosen, chosen)',
          ['tests/test_latent.py', '-k', 'draws'], 'training never takes the cached mirror view'),
    Fault('latent_cache_ignores_the_autoencoder', 'datasets/latents.py',
          '{vae.signature()}', '',
          ['tests/test_latent.py', '-k', 'another_autoencoder'], "another autoencoder's run reads the old cache"),
    Fault('latent_encoding_restarts_after_a_kill', 'datasets/latents.py',
          "if progress.get('shape') == list(shape):", 'if False:',
          ['tests/test_latent.py', '-k', 'killed'], 'a killed encoding starts over'),
    Fault('latent_samples_not_decoded', 'datasets/latents.py',
          'return loaded[0].decode(autoencoder.model_to_latent(x, scale, shift))',
          'return autoencoder.model_to_latent(x, scale, shift).clamp(0.0, 1.0)',
          ['tests/test_latent.py', '-k', 'grid or eval_sweep'], 'grids and the eval sweep show latents, not images'),
    Fault('adamw_is_adam', 'losses.py', "'AdamW': torch.optim.AdamW}", "'AdamW': torch.optim.Adam}",
          ['tests/test_fast_step.py', '-k', 'weight_decay'], "AdamW's decay added to the gradient, as Adam's"),
    Fault('dit_sweep_without_ema', 'run_lib.py',
          "    with state['ema'].average_parameters(params):\n      if e.enable_loss and main_process:",
          "    if True:\n      if e.enable_loss and main_process:",
          ['tests/test_dit.py', '-k', 'eval_sweep_of_a_dit'], "the DiT's eval sweep samples the raw weights"),
    Fault('distillation_at_uniform_times', 'losses.py',
          "    return lambda batch_size, device, generator=None: torch.full((batch_size,), eps, device=device)",
          "    return None",
          ['tests/test_dit.py', '-k', 'student'], 'one-step distillation trains at uniform times'),
]


def tracked_files():
  listed = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO_ROOT, capture_output=True, check=True).stdout
  return [name for name in listed.decode().split('\0') if name]


def copy_tree(target):
  for name in tracked_files():
    source = os.path.join(REPO_ROOT, name)
    if os.path.isfile(source):
      os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
      shutil.copy2(source, os.path.join(target, name))


def apply(fault, tree):
  path = os.path.join(tree, fault.file)
  with open(path, encoding='utf-8') as handle:
    text = handle.read()
  count = text.count(fault.old)
  if count != 1:
    raise SystemExit(f'fault {fault.name}: the text to replace occurs {count} times in {fault.file} (expected once); '
                     f'update the fault to the current code')
  with open(path, 'w', encoding='utf-8') as handle:
    handle.write(text.replace(fault.old, fault.new))


def run_tests(tree, tests, log_path):
  """Runs ``tests`` in ``tree``; returns (exit code, summary line)."""
  env = {**os.environ, 'OMP_NUM_THREADS': '1',
         'RF_REFERENCE_DIR': os.environ.get('RF_REFERENCE_DIR',
                                            os.path.join(REPO_ROOT, '..', 'shared', 'reference'))}
  with open(log_path, 'w', encoding='utf-8') as log:
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *tests],
                            cwd=tree, stdout=log, stderr=subprocess.STDOUT, env=env)
  with open(log_path, encoding='utf-8') as log:
    lines = [line.strip() for line in log if line.strip()]
  return result.returncode, lines[-1] if lines else ''


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='comma-separated fault names')
  parser.add_argument('--list', action='store_true', help='list the faults and exit')
  parser.add_argument('--keep', action='store_true', help='keep the temporary trees and logs')
  args = parser.parse_args()
  faults = FAULTS
  if args.only:
    wanted = args.only.split(',')
    unknown = sorted(set(wanted) - {fault.name for fault in FAULTS})
    if unknown:
      raise SystemExit(f'unknown faults {unknown}; valid: {[fault.name for fault in FAULTS]}')
    faults = [fault for fault in FAULTS if fault.name in wanted]
  if args.list:
    for fault in faults:
      print(f'{fault.name:32s} {fault.file:40s} {fault.why}; tests: {" ".join(fault.tests)}')
    return 0

  workspace = tempfile.mkdtemp(prefix='mutation_check_')
  clean = os.path.join(workspace, 'clean')
  copy_tree(clean)
  for tests in sorted({tuple(fault.tests) for fault in faults}):  # Each selection must pass (and select something).
    started = time.monotonic()
    code, summary = run_tests(clean, tests, os.path.join(workspace, 'clean.log'))
    print(f'unchanged tree, {" ".join(tests)}: {summary} ({time.monotonic() - started:.0f} s)', flush=True)
    if code != 0 or 'passed' not in summary:
      print(f'these tests fail (or none ran) on the unchanged tree; see {workspace}/clean.log')
      return 2

  survived = []
  for fault in faults:
    tree = os.path.join(workspace, fault.name)
    shutil.copytree(clean, tree)
    apply(fault, tree)
    started = time.monotonic()
    code, summary = run_tests(tree, fault.tests, os.path.join(workspace, f'{fault.name}.log'))
    caught = code != 0 and ('failed' in summary or 'error' in summary)
    if not caught:
      survived.append(fault.name)
    print(f'{"caught  " if caught else "SURVIVED"} {fault.name:32s} {summary} ({time.monotonic() - started:.0f} s)',
          flush=True)
    if not args.keep:
      shutil.rmtree(tree)
  print(f'{len(faults) - len(survived)} of {len(faults)} faults caught'
        + (f'; survived: {", ".join(survived)}' if survived else ''))
  if not args.keep:
    shutil.rmtree(workspace)
  return 1 if survived else 0


if __name__ == '__main__':
  sys.exit(main())
