"""Command line: ``python main.py --config CONFIG --workdir DIR --mode train|eval|reflow [--config.a.b=value]``."""
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import distributed
import interruption
import run_lib
from configs import with_defaults

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory: checkpoints, samples, logs and the resolved config.')
flags.DEFINE_enum('mode', None, ['train', 'eval', 'reflow', 'stats'],
                  'Running mode: train, eval, reflow, or stats (reference statistics for FID).')
flags.DEFINE_string('eval_folder', 'eval', 'Folder under the workdir for evaluation results.')
flags.DEFINE_string('device', None, "Device: 'auto' (the LOCAL_RANK GPU when CUDA is present, else the CPU), 'cpu', "
                    "'cuda' or 'cuda:N'; overrides --config.device.")
flags.DEFINE_bool('traceback', False, 'Show the full traceback of configuration and input errors.')
flags.mark_flags_as_required(['config', 'workdir', 'mode'])


def log_to_file(path):
  """Sends log records to ``path`` as well as to stderr."""
  handler = logging.StreamHandler(open(path, 'a', encoding='utf-8'))
  handler.setFormatter(logging.Formatter('%(levelname)s %(asctime)s %(filename)s:%(lineno)d] %(message)s'))
  logging.getLogger().addHandler(handler)  # The root logger: the framework's records and absl's (which propagate).


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, workdir = with_defaults(FLAGS.config), FLAGS.workdir  # Keys added since the file was written: defaults.
  if FLAGS.device is not None:
    config.device = FLAGS.device
  if FLAGS.mode == 'eval' and not os.path.isdir(workdir):
    sys.exit(f'error: --workdir {workdir!r} does not exist; --mode eval reads the checkpoints of an existing work '
             f'directory')
  rank = int(os.environ.get('RANK', 0))  # torchrun: rank 0 logs; the others report warnings, in their own file.
  absl_logging.set_verbosity(absl_logging.INFO if rank == 0 else absl_logging.WARNING)
  os.makedirs(workdir, exist_ok=True)
  log_to_file(os.path.join(workdir, 'stdout.txt' if rank == 0 else f'stdout_rank{rank}.txt'))
  try:
    run(config, workdir)
    distributed.shutdown()
  except interruption.TrainingInterrupted as stopped:
    logging.warning('%s', stopped)
    sys.exit(stopped.exit_code)
  except USER_ERRORS as error:  # Bad paths, configs or files: the message says what to fix.
    if FLAGS.traceback:
      raise
    logging.error('%s: %s', type(error).__name__, error)
    sys.exit(f'error: {error}\n(run with --traceback for the stack trace)')


# Errors caused by the command line, the config or the input files; their messages name the fix.
# OSError covers missing files and folders, offline downloads and too little disk; CheckpointReadError is a ValueError.
USER_ERRORS = (OSError, ValueError, run_lib.NonFiniteLossError)


def run(config, workdir):
  if FLAGS.mode == 'train':
    run_lib.train(config, workdir)
  elif FLAGS.mode == 'eval':
    run_lib.evaluate(config, workdir, FLAGS.eval_folder)
  elif FLAGS.mode == 'stats':
    run_lib.compute_reference_stats(config, workdir)
  else:
    run_lib.reflow(config, workdir)


if __name__ == '__main__':
  app.run(main)
