"""SIGTERM / SIGINT as a request to stop: the training loop finishes its update, saves a checkpoint and exits.

Clusters pre-empt jobs with SIGTERM (SLURM, Kubernetes, torchrun forward it to every rank) and users stop runs
with Ctrl-C; either way the run must leave a checkpoint of its last update. A second SIGINT interrupts at once.
"""
import logging
import signal
import threading


class TrainingInterrupted(Exception):
  """Raised after the checkpoint of a stop request was written; ``exit_code`` is 128 + the signal number."""

  def __init__(self, signum, step, path):
    self.signum, self.step, self.path = signum, step, path
    self.exit_code = 128 + signum
    super().__init__(f'{signal.Signals(signum).name} received: stopped after update {step} and saved {path}; '
                     f'run the same command again to resume')


class StopRequests:
  """Context manager that turns SIGTERM and SIGINT into ``self.signum`` (None until one arrives)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Pressed twice: stop now, without the checkpoint.
    self.signum = signum
    logging.warning('%s received: stopping after the current update (its checkpoint is written first)',
                    signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python only delivers signals there.
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
    return False
