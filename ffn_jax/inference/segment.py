"""One segment being flooded by the canvas: its object map, movement queue, extent and state."""
from __future__ import annotations

import numpy as np

from ffn_jax.inference.movement import FaceMaxPolicy


class Segment:
  """One segment being flooded: its object map, move queue and extent.

  A *continuation* (``label`` > 0) carries on an object that the canvas was given as a prior
  label (a neighbouring tile's segment): its map starts with ``init_activation`` on that
  object's voxels near ``starts`` instead of one seed voxel, its queue holds every start, and
  its voxels are committed under ``label`` instead of a new ID.

  The canvas-sized object map is taken when the segment first runs (``activate``), so
  waiting segments in the look-ahead window cost no memory, and given back by ``release``.
  Maps are recycled through the canvas's ``MapPool``: a map is all NaN when taken, and
  clearing one touches only the box its FOVs wrote (a fresh canvas-sized NaN fill is 10-25 ms
  on a 180-280³ canvas, per segment and per speculative restart).
  """

  def __init__(self, cand_idx: int, start, canvas, label: int = 0):
    """``canvas``: the ``canvas.Canvas`` it floods in (read: deltas, thresholds, map pool,
    margin, prior labels; not imported here, so that the canvas may import this module)."""
    self.cand_idx = int(cand_idx)
    self.starts = np.asarray(start, np.int64).reshape(-1, 3)
    self.start = tuple(int(v) for v in self.starts[0])
    self.label = int(label)
    self.policy = FaceMaxPolicy(canvas.deltas, canvas.th.move_f64)
    self.seed = None
    self._pool = canvas.maps
    self._margin = canvas.margin
    self._init = canvas.th.init
    self._prior = canvas.prior
    self.reset()

  def _write_start(self) -> None:
    if not self.label:
      self.seed[self.start] = self._init
      return
    # The prior object's voxels within the FOVs at the starts (what _clear clears).
    box = self._start_box()
    self.seed[box][self._prior[box] == self.label] = self._init

  def _start_box(self):
    lo = np.maximum(self.starts.min(axis=0) - self._margin, 0)
    hi = self.starts.max(axis=0) + self._margin + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

  def activate(self) -> None:
    if self.seed is None:
      self.seed = self._pool.take()
      self._write_start()

  def written_box(self) -> tuple:
    """The box of the object map this segment has written: every write was an FOV box around
    a position in [min_pos, max_pos] (``Canvas._apply``) or the start voxels' FOV boxes, which
    that range holds."""
    lo = np.maximum(self.min_pos - self._margin, 0)
    hi = self.max_pos + self._margin + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

  def _clear(self) -> None:
    """Back to all NaN (only the written box can differ)."""
    self.seed[self.written_box()] = np.nan

  def release(self) -> None:
    """Gives the object map back to the pool (the segment is finished or dropped)."""
    if self.seed is not None:
      self._clear()
      self._pool.give(self.seed)
      self.seed = None

  def reset(self) -> None:
    if self.seed is not None:
      self._clear()
      self._write_start()
    self.policy.reset(self.starts)
    self.iters = 0
    self.min_pos = self.starts.min(axis=0)
    self.max_pos = self.starts.max(axis=0)
    self.done = False
    self.consulted: list = []  # positions whose segmentation value decided a pop

  def get_state(self) -> dict:
    st = {f"policy_{k}": v for k, v in self.policy.get_state().items()}
    st.update(cand_idx=np.int64(self.cand_idx), start=self.starts, label=np.int64(self.label),
              seed=self.seed, iters=np.int64(self.iters), min_pos=self.min_pos,
              max_pos=self.max_pos, done=np.bool_(self.done))
    return st

  def set_state(self, st: dict) -> None:
    self.activate()
    self.seed[...] = st["seed"]
    self.policy.set_state({k[len("policy_"):]: v for k, v in st.items()
                           if k.startswith("policy_")})
    self.iters = int(st["iters"])
    self.min_pos = np.asarray(st["min_pos"], np.int64)
    self.max_pos = np.asarray(st["max_pos"], np.int64)
    self.done = bool(st["done"])


class MapPool:
  """Canvas-sized float32 object maps, all NaN when taken. Given-back maps are kept for reuse
  while maps in use plus spares stay within ``limit`` (the canvas's look-ahead, which already
  bounds the maps in use), so the pool adds no memory beyond the peak without it."""

  def __init__(self, shape, limit: int):
    self.shape = tuple(shape)
    self.limit = int(limit)
    self.in_use = 0
    self.free: list = []

  def take(self) -> np.ndarray:
    self.in_use += 1
    if self.free:
      return self.free.pop()
    return np.full(self.shape, np.nan, np.float32)

  def give(self, seed: np.ndarray) -> None:
    self.in_use -= 1
    if self.in_use + len(self.free) < self.limit:
      self.free.append(seed)
