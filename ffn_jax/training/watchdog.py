"""Deadlines that hold even while the main thread is stuck in XLA or an MPI collective.

``Watchdog`` turns SIGTERM into a flag the training loop polls (it then saves and exits 75), and
enforces two deadlines from a daemon thread: ``preemption_grace_s`` after SIGTERM (the save did
not finish in time: exit anyway) and ``step_timeout_s`` without progress (a rank died or hangs:
end every rank rather than wait in an allreduce forever).
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

from ffn_jax import parallel

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM received, checkpoint saved, rerun to continue
EXIT_STALLED = 1  # no training progress within step_timeout_s


class Watchdog:
  """SIGTERM flag for the loop, plus two deadlines enforced from a daemon thread.

  Python runs signal handlers only between bytecodes of the main thread, which may sit for
  minutes in an XLA compile or forever in an MPI collective. So the C-level handler also writes
  the signal number into a pipe (``signal.set_wakeup_fd``) that this thread watches: the grace
  period starts when SIGTERM arrives, not when the main thread notices it. Past a deadline the
  thread prints one line and ends every rank (``parallel.hard_exit``).
  """

  def __init__(self, grace_s: float, step_timeout_s: float, prefix: str = ""):
    self.sigterm_at = None
    self._grace_s, self._timeout_s, self._prefix = float(grace_s), float(step_timeout_s), prefix
    self._beat, self._where = None, ""  # armed by beat(): setup may legitimately take long
    self._read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    self._signals = threading.current_thread() is threading.main_thread()
    if self._signals:
      self._prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._prev_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._run, name="ffn-watchdog", daemon=True)
    self._thread.start()

  def _on_sigterm(self, signum, frame):  # noqa: ARG002
    self._note_sigterm()

  def _note_sigterm(self):
    # No lock: a handler may re-enter while the main thread runs it; setting twice is harmless.
    if self.sigterm_at is None:
      self.sigterm_at = time.monotonic()

  def beat(self, where: str) -> None:
    """Progress was made; ``where`` names it in the stall message."""
    self._beat, self._where = time.monotonic(), where

  def _run(self):
    while True:
      ready, _, _ = select.select([self._read_fd], [], [], 0.25)
      if ready:
        data = os.read(self._read_fd, 512)
        if not data:  # close() closed the write end
          return
        if int(signal.SIGTERM) in data:
          self._note_sigterm()
      now = time.monotonic()
      if self.sigterm_at is not None and now - self.sigterm_at > self._grace_s:
        self._expire(f"SIGTERM: the checkpoint was not saved within preemption_grace_s="
                     f"{self._grace_s:g} s; exiting without it (rerun the same command to "
                     "continue from the last complete checkpoint)", EXIT_PREEMPTED)
      if (self._timeout_s > 0 and self._beat is not None
          and now - self._beat > self._timeout_s):
        self._expire(f"error: no training progress for {self._timeout_s:g} s (step_timeout_s) "
                     f"{self._where}: another rank may have died or hung; aborting all ranks",
                     EXIT_STALLED)

  def _expire(self, message: str, code: int) -> None:
    print(f"{self._prefix}{message}", file=sys.stderr, flush=True)
    parallel.hard_exit(code)

  def close(self) -> None:
    """Restores the previous SIGTERM handling and stops the thread; after a SIGTERM the thread
    keeps enforcing the grace period until the process exits (MPI_Finalize could still hang)."""
    if self._signals:
      signal.set_wakeup_fd(self._prev_wakeup)
      signal.signal(signal.SIGTERM, self._prev_handler)
    self._timeout_s = 0.0
    if self.sigterm_at is not None:
      return
    os.close(self._write_fd)
    self._thread.join(timeout=2)
    os.close(self._read_fd)
