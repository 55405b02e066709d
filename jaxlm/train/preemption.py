"""Preemption: SIGTERM / SIGINT ask the loop to finish its step, save, and exit cleanly.

On a multi-process run the notice is agreed through JAX's preemption sync point, so every host
stops (and saves) at the same step.
"""

import os
import signal

import jax
from jax.experimental import multihost_utils

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(Exception):
  """Raised by the loop after the preemption checkpoint is on disk; `code` is the exit status."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


class PreemptionGuard:
  """Context manager: while active, SIGTERM/SIGINT set a flag instead of killing the process.

  A second signal of the same kind gets the default behaviour (kills at once).
  """

  def __init__(self):
    self.signum = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    if self._multiprocess:  # JAX's preemption notifier owns the signals; hosts must agree
      return self
    for signum in EXIT_CODES:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    self.signum = signum
    signal.signal(signum, signal.SIG_DFL)

  def should_stop(self, step: int) -> bool:
    """True when the run must stop after `step` (identical on all hosts when multi-process)."""
    if self._multiprocess:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None

  @property
  def exit_code(self) -> int:
    return EXIT_CODES.get(self.signum, 143)

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else "preemption notice"

  def stop(self, ckpt, step: int):
    """Waits until checkpoint `step` (already saved by the loop) is on disk, then raises
    Preempted naming it."""
    ckpt.wait()
    raise Preempted(f"preempted by {self.signal_name} at step {step}: checkpoint saved to "
                    f"{os.path.join(ckpt.directory, str(step))}", self.exit_code)
