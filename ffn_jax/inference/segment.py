"""One segment being flooded by the canvas: its object map, movement queue, extent and state."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ffn_jax.inference.movement import FaceMaxPolicy

if TYPE_CHECKING:
  from ffn_jax.inference import canvas as canvas_lib


class Segment:
  """One segment being flooded: its object map, move queue and extent.

  The canvas-sized object map is allocated when the segment first runs (``activate``), so
  waiting segments in the look-ahead window cost no memory.
  """

  def __init__(self, cand_idx: int, start, canvas: "canvas_lib.Canvas"):
    self.cand_idx = int(cand_idx)
    self.start = tuple(int(v) for v in start)
    self.policy = FaceMaxPolicy(canvas.deltas, canvas.th.move_f64)
    self.seed = None
    self._shape = canvas.shape
    self._init = canvas.th.init
    self.reset()

  def activate(self) -> None:
    if self.seed is None:
      self.seed = np.empty(self._shape, np.float32)
      self.reset()

  def reset(self) -> None:
    if self.seed is not None:
      self.seed.fill(np.nan)
      self.seed[self.start] = self._init
    self.policy.reset(self.start)
    self.iters = 0
    self.min_pos = np.array(self.start)
    self.max_pos = np.array(self.start)
    self.done = False
    self.consulted: list = []  # positions whose segmentation value decided a pop

  def get_state(self) -> dict:
    st = {f"policy_{k}": v for k, v in self.policy.get_state().items()}
    st.update(cand_idx=np.int64(self.cand_idx), start=np.array(self.start, np.int64),
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
