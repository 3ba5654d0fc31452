"""The one logger of train.py and infer.py: progress lines on stdout, flushed at once (so that
``mpirun`` and Slurm forward them as they come), from the ranks that should speak.

``logger("infer")`` prints ``[infer] message``; ``logger()`` prints the message as it is (the
training loop's lines); ``active=False`` (ranks other than 0) prints nothing.
"""
from __future__ import annotations

from typing import Callable


def logger(tag: str = "", active: bool = True) -> Callable[[str], None]:
  prefix = f"[{tag}] " if tag else ""

  def log(msg: str) -> None:
    if active:
      print(f"{prefix}{msg}", flush=True)

  return log


def fmt_duration(seconds: float) -> str:
  """``1h02m``, ``4m05s``: a duration as progress lines show it."""
  s = int(round(max(seconds, 0.0)))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
