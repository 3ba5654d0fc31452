"""Where the training loop's records go (rank 0 only): ``WORKDIR/metrics.jsonl``, one JSON
object per line, and TensorBoard event files in ``WORKDIR/tensorboard`` (tensorboardX: no
TensorFlow needed), one scalar per numeric field.

``MetricWindow`` sums the step statistics between two log lines and turns them into the
training record.

Scalar tags: training records' fields as they are (``loss``, ``f1``, ``fovs_per_s``, ...), eval
records' under ``eval/`` (``eval/vi``, ...), the final record's under ``final/``, the
calibration's (``eval.calibrate``) under ``calibration/``; all at the record's ``step``.
"""
from __future__ import annotations

import json
import math
import os
import time

from ffn_jax import losses

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
  prefix = ("eval/" if record.get("eval") else "final/" if record.get("final") else
            "calibration/" if record.get("calibration") else "")
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


class MetricWindow:
  """The training steps since the last log line: summed loss, confusion counts and timings,
  and the seconds spent evaluating in between, which the window's throughput leaves out.

  Args:
    global_batch: examples per step over all ranks and devices (the FOV rate's numerator).
    ranks, local_devices: recorded with every record.
  """

  def __init__(self, global_batch: int, ranks: int, local_devices: int):
    self.global_batch = int(global_batch)
    self.ranks, self.local_devices = int(ranks), int(local_devices)
    self.reset()

  def reset(self, now: float | None = None) -> None:
    self.sums = {"loss": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "time_step_s": 0.0,
                 "time_allreduce_s": 0.0, "time_data_s": 0.0}
    self.steps = 0
    self.excluded_s = 0.0
    self.t0 = time.perf_counter() if now is None else now

  def add(self, stats: dict, times: dict, data_s: float) -> None:
    """One step: its stats (loss, tp, fp, fn) and timings (step, allreduce; data loading)."""
    for k in ("loss", "tp", "fp", "fn"):
      self.sums[k] += float(stats[k])
    self.sums["time_step_s"] += times["time_step_s"]
    self.sums["time_allreduce_s"] += times["time_allreduce_s"]
    self.sums["time_data_s"] += data_s
    self.steps += 1

  def exclude(self, seconds: float) -> None:
    """Time inside the window that was not training (an evaluation)."""
    self.excluded_s += seconds

  def record(self, step: int, learning_rate: float, now: float) -> dict:
    """The window's training record at ``step`` (means per step, FOV/s of training time)."""
    n, a = self.steps, self.sums
    precision, recall, f1 = losses.precision_recall_f1(a["tp"], a["fp"], a["fn"])
    return {"step": step, "loss": a["loss"] / n, "learning_rate": learning_rate,
            "precision": precision, "recall": recall, "f1": f1,
            "fovs_per_s": n * self.global_batch / (now - self.t0 - self.excluded_s),
            "ranks": self.ranks, "local_devices": self.local_devices,
            "global_batch": self.global_batch, "time_step_s": a["time_step_s"] / n,
            "time_allreduce_s": a["time_allreduce_s"] / n, "time_data_s": a["time_data_s"] / n}
