"""The training loop's periodic work, one small object per kind, in the style of clu's
``periodic_actions``: logging metrics, checkpoints, rank sync checks, segmentation evals.

Each ``PeriodicAction`` wraps a function of the step with its own schedule: every ``every_steps``
steps and/or every ``every_s`` seconds of wall time (whichever comes first; 0 = off), and
optionally at the last step. The loop asks every action whether it is due, makes all ranks agree
on the answer in one collective (rank 0's clock decides time-based schedules: see
``parallel.Dist.agree``), then runs the due ones in order. Each action counts the time it spent,
so the loop can report what evaluation and checkpoints cost as a share of the wall time.
"""
from __future__ import annotations

import time
from typing import Callable


class PeriodicAction:
  """``fn(step)`` on a schedule of steps and/or seconds.

  Args:
    name: short name (used in timings: ``time_<name>_s``).
    fn: called with the step number (the number of finished steps).
    every_steps: due when ``step % every_steps == 0`` (0 = not by steps).
    every_s: due when this many seconds passed since it last ran, or since ``start`` (0 = not by
      time).
    at_end: also due at the last step.
  """

  def __init__(self, name: str, fn: Callable[[int], None], every_steps: int = 0,
               every_s: float = 0.0, at_end: bool = False):
    self.name = name
    self._fn = fn
    self.every_steps = int(every_steps)
    self.every_s = float(every_s)
    self.at_end = bool(at_end)
    self.spent_s = 0.0
    self.runs = 0
    self.last_step = -1
    self._last_t = time.perf_counter()

  @property
  def enabled(self) -> bool:
    return self.every_steps > 0 or self.every_s > 0 or self.at_end

  def start(self, now: float | None = None) -> None:
    """Starts the clock of a time-based schedule (at the first step of a run)."""
    self._last_t = time.perf_counter() if now is None else now

  def due(self, step: int, now: float, last: bool) -> bool:
    """Whether this action should run after ``step`` (this rank's view)."""
    if step == self.last_step:
      return False
    return bool((last and self.at_end)
                or (self.every_steps > 0 and step % self.every_steps == 0)
                or (self.every_s > 0 and now - self._last_t >= self.every_s))

  def __call__(self, step: int) -> None:
    t0 = time.perf_counter()
    self._fn(step)
    self._last_t = time.perf_counter()
    self.spent_s += self._last_t - t0
    self.runs += 1
    self.last_step = step


def agreed_due(actions: list[PeriodicAction], dist, step: int, last: bool,
            sigterm: bool) -> tuple[list[PeriodicAction], bool]:
  """The actions due after ``step`` as every rank agrees, and whether any rank got SIGTERM.

  One collective per step (none on a single rank). Runs nothing itself: returns what to run.
  """
  now = time.perf_counter()
  flags, preempted = dist.agree([a.due(step, now, last) for a in actions], sigterm)
  return [a for a, due in zip(actions, flags) if due], preempted
