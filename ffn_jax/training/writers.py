"""Where the training loop's records go (rank 0 only): ``WORKDIR/metrics.jsonl``, one JSON
object per line, and TensorBoard event files in ``WORKDIR/tensorboard`` (tensorboardX: no
TensorFlow needed), one scalar per numeric field.

Scalar tags: training records' fields as they are (``loss``, ``f1``, ``fovs_per_s``, ...), eval
records' under ``eval/`` (``eval/vi``, ...), the final record's under ``final/``; all at the
record's ``step``.
"""
from __future__ import annotations

import json
import math
import os

TENSORBOARD_DIR = "tensorboard"


def drop_partial_line(path: str) -> None:
  """A kill during an append can leave a last line without its newline; drop that fragment."""
  try:
    with open(path, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
  except FileNotFoundError:
    pass


def scalars(record: dict) -> dict[str, float]:
  """The TensorBoard tags and values of one record (numbers only; booleans and text skipped)."""
  prefix = "eval/" if record.get("eval") else "final/" if record.get("final") else ""
  return {prefix + k: float(v) for k, v in record.items()
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(float(v))}


class MetricWriter:
  """Appends records to metrics.jsonl and TensorBoard; does nothing where ``active`` is False."""

  def __init__(self, workdir: str, active: bool, tensorboard: bool = True):
    self.active = active
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if active:
      drop_partial_line(self.path)
      if tensorboard:
        from tensorboardX import SummaryWriter  # local: only the writing rank needs it
        self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), flush_secs=30)

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for tag, value in scalars(record).items():
        self._tb.add_scalar(tag, value, int(record["step"]))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
