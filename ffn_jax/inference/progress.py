"""Progress and ETA of a flood, from the work that actually advances: FOV calls.

A block's FOV total is not known in advance, and seeds are a poor proxy for it: batched floods
commit in seed order (the seed count stalls for minutes while the first large objects flood),
and most late seeds cost nothing (they lie inside objects already flooded). Two quantities do
advance with the work, and each alone misleads at some stage of a flood:

- the *open candidates* (``Canvas.open_candidates``): segments in flight, and seeds not yet
  started that no segment holds or is flooding. FOVs still to come = open candidates x FOVs
  spent per candidate closed so far. Too short while a few large objects flood: they close no
  candidate, and the last candidates cost far more than the average.
- the *covered voxels* (``Canvas.covered_voxels``): voxels held by a segment or reached by one
  in flight. FOVs still to come = voxels left to cover x FOVs per voxel covered so far, with
  ``EXPECTED_COVERAGE`` of the canvas as the end point (a dense segmentation labels 75-90 % of
  a canvas; the rest is membrane and unlabelled debris). Too short at the start, when the
  first FOVs of many segments cover much at once, and too long at the end of a block that
  ends below that share.

The estimate is the larger of the two (each errs short where the other holds), and the ETA is
that at the measured FOV rate (docs/inference.md: within 2x on 98 % of the lines after the
first 10 % of two FIB-25 boxes).

``TiledProgress`` does the same over tiles: tiles done, plus the current tile's fraction.
"""
from __future__ import annotations

import time

from ffn_jax.log import fmt_duration

# The share of a canvas a flood is expected to cover by its end (the voxel estimate's end point).
EXPECTED_COVERAGE = 0.8


class FloodProgress:
  """Logs ``canvas``'s progress every ``every_s`` seconds (< 0: never) through ``log``.

  Args:
    canvas: the ``Canvas`` being flooded.
    every_s: seconds between lines.
    log: ``log(line)``, or None for no lines (the estimate is still available).
    wall0: seconds of the block's wall time before this object was made (model load, a run
      before a resume).
    outer: the progress of a larger job this block is part of (``TiledProgress``), which
      writes the line instead.
  """

  def __init__(self, canvas, every_s: float, log, wall0: float = 0.0, outer=None):
    self.canvas = canvas
    self.outer = outer
    self.every_s = float(every_s)
    self.log = log
    self._t0 = time.perf_counter()
    self._wall0 = float(wall0)
    self._last = self._t0
    self._fov0 = canvas.counters.get("fov_calls", 0)
    self._open0 = None
    self._t_first = None  # after the first batch: compiling is done
    self._fov_first = self._fov0
    self._cov0 = canvas.covered_voxels()

  def wall_s(self) -> float:
    return self._wall0 + time.perf_counter() - self._t0

  def fovs_left(self) -> tuple[int, float]:
    """(FOV calls of this flood so far, the estimate of those still to come)."""
    c = self.canvas
    fov = c.counters.get("fov_calls", 0) - self._fov0
    open_now = c.open_candidates()
    if self._open0 is None:
      self._open0 = open_now
    if open_now == 0:
      return fov, 0.0
    by_candidates = open_now * fov / max(self._open0 - open_now, 1)
    covered = c.covered_voxels()
    gained = covered - self._cov0
    by_voxels = 0.0
    if gained > 0:
      by_voxels = max(EXPECTED_COVERAGE * c.segmentation.size - covered, 0.0) * fov / gained
    return fov, max(by_candidates, by_voxels)

  def estimate(self) -> tuple[float, float]:
    """(fraction of this flood's FOVs done, seconds left); NaN seconds before any rate."""
    c = self.canvas
    fov, left = self.fovs_left()
    if fov <= 0:
      return 0.0, float("nan")
    if left == 0:
      return 1.0, 0.0
    frac = fov / (fov + left)
    now = time.perf_counter()
    done_timed = c.counters.get("fov_calls", 0) - self._fov_first
    if self._t_first is None or done_timed <= 0:
      return frac, float("nan")
    return frac, left * (now - self._t_first) / done_timed

  def update(self) -> None:
    """After each batch: start the rate clock, and log a line when one is due."""
    now = time.perf_counter()
    if self._t_first is None:
      self._t_first, self._fov_first = now, self.canvas.counters.get("fov_calls", 0)
      self._open0 = self.canvas.open_candidates() if self._open0 is None else self._open0
    if self.log is None or self.every_s < 0 or now - self._last < self.every_s:
      return
    self._last = now
    c = self.canvas
    frac, eta = self.estimate()
    done, total = c.progress()
    fov = c.counters.get("fov_calls", 0)
    rate = (fov - self._fov0) / max(now - self._t0, 1e-9)
    line = (f"fov {fov} ({rate:.2f}/s)  ~{100 * frac:.0f}% done  seeds {done}/{total}  "
            f"segments {c.counters.get('segments', 0)}  elapsed {fmt_duration(self.wall_s())}"
            f"  ETA {_eta(eta)}")
    self.log(line if self.outer is None else self.outer.line(frac, line))


def _eta(seconds: float) -> str:
  return fmt_duration(seconds) if seconds == seconds else "?"


class TiledProgress:
  """The progress of a tiled job on one rank: tiles finished by every rank (their
  ``counters.json``), plus the fraction of this rank's current tile; the ETA is the remaining
  tiles at the rate tiles were finished (or partly) since this launch began.

  Args:
    done: ``done()`` -> the number of tiles finished so far, by any rank.
    total: the number of tiles.
    rank: this rank (named in the lines).
  """

  def __init__(self, done, total: int, rank: int):
    self._done = done
    self.total = int(total)
    self.rank = int(rank)
    self.tile = ""
    self._t0 = time.perf_counter()
    self._done0 = done()

  def start(self, tile_name: str) -> "TiledProgress":
    self.tile = tile_name
    return self

  def estimate(self, tile_fraction: float) -> tuple[int, float]:
    """(tiles finished, seconds left for the whole job; NaN before any progress)."""
    done = self._done()
    progressed = done - self._done0 + tile_fraction
    left = max(self.total - done - tile_fraction, 0.0)
    if progressed <= 0:
      return done, float("nan")
    return done, left * (time.perf_counter() - self._t0) / progressed

  def line(self, tile_fraction: float, flood_line: str) -> str:
    done, eta = self.estimate(tile_fraction)
    return (f"rank {self.rank}: tile {self.tile}: {flood_line}  |  tiles {done}/{self.total} "
            f"done, job ETA {_eta(eta)}")
