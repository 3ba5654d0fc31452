"""The canvas around a block (``border_padding``): how much image a block's canvas takes on each
side, where it comes from (the real volume or a mirror), and how to crop canvas arrays back to
the block."""
from __future__ import annotations

import numpy as np

from ffn_jax.errors import UserError


class BorderPadding:
  """The canvas around a block: ``border_padding`` "none" (Google's: the canvas is the block),
  "reflect" (the block mirrored by half a FOV on every side) or "context" (half a FOV of the
  real image around the block where the volume has it, mirrored beyond the volume's end).

  A FOV centre must lie half a FOV inside the canvas, so without padding no FOV is centred in
  the block's outer half-FOV shell and objects there are reached only by the edges of FOVs
  further in; in thin volumes (gala: 50 slices, FOV 33: centres only at z 16..33) most of the
  block is such a shell, and on FIB-25 that shell is where most of the merges are
  (docs/benchmarks.md section 7). With "reflect" or "context", FOVs can be centred anywhere in
  the block, seeds are kept inside it, and the segmentation is cropped back to it. "context"
  lets a tile (or a box inside a larger volume) see its neighbours' image instead of a mirror.
  """

  MODES = ("none", "reflect", "context")

  def __init__(self, config, model: dict, inner_lo=(False,) * 3, inner_hi=(False,) * 3):
    """``inner_lo``/``inner_hi``: per axis, whether the block's low/high face lies inside the
    job (a tile's face towards a neighbour tile): it gets half a FOV of the real image whatever
    the mode, so that the tile's FOVs reach it as they would in one pass."""
    mode = str(config.get("border_padding", "none"))
    if mode not in self.MODES:
      raise UserError(f"border_padding must be one of {self.MODES}, got {mode!r}")
    half = np.asarray(model["fov_size_zyx"], np.int64) // 2
    base = half if mode != "none" else np.zeros(3, np.int64)
    inner_lo, inner_hi = np.asarray(inner_lo, bool), np.asarray(inner_hi, bool)
    self.lo = np.where(inner_lo, half, base)  # padding before the block, per axis
    self.hi = np.where(inner_hi, half, base)  # and after it
    self._real_lo = inner_lo | (mode == "context")
    self._real_hi = inner_hi | (mode == "context")
    # Whether inner faces change the canvas (recorded in the job identity); "context" has them.
    self.inner = bool((inner_lo | inner_hi).any()) and mode != "context"

  def read(self, volume, bbox, window=None) -> np.ndarray:
    """``volume``'s block ``bbox`` = (start, size) with this padding around it: the real image
    where a face takes it and the volume has it, mirrored otherwise.

    ``window``: (lo, hi) volume zyx, only that part of the padded block (which it must lie in
    and overlap the block); the same values as the whole padded block has there."""
    start, size = (np.asarray(v, np.int64) for v in bbox)
    stop = start + size
    shape = np.asarray(volume.shape[:3], np.int64)
    want_lo, want_hi = start - self.lo, stop + self.hi
    if window is not None:
      win_lo, win_hi = (np.asarray(v, np.int64) for v in window)
      if np.any(win_lo < want_lo) or np.any(win_hi > want_hi) or np.any(win_lo >= stop) or \
          np.any(win_hi <= start):
        raise ValueError(f"window {window} is not inside the padded block {want_lo}..{want_hi} "
                         f"or misses the block {bbox}")
      want_lo, want_hi = win_lo, win_hi
    real_lo = np.where(self._real_lo, np.maximum(start - self.lo, 0), start)
    real_hi = np.where(self._real_hi, np.minimum(stop + self.hi, shape), stop)
    lo, hi = np.maximum(want_lo, real_lo), np.minimum(want_hi, real_hi)
    block = volume.read(tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo))
    missing = [(int(a - w), int(v - b)) for a, b, w, v in zip(lo, hi, want_lo, want_hi)]
    return np.pad(block, missing, mode="reflect") if any(any(m) for m in missing) else block

  def pad(self, block: np.ndarray | None, mode: str = "reflect") -> np.ndarray | None:
    if block is None or not (self.lo.any() or self.hi.any()):
      return block
    return np.pad(block, [(int(a), int(b)) for a, b in zip(self.lo, self.hi)], mode=mode)

  def crop(self, canvas_array: np.ndarray) -> np.ndarray:
    return canvas_array[tuple(slice(int(a), s - int(b))
                              for a, b, s in zip(self.lo, self.hi, canvas_array.shape))]

  def inside(self, coords_N3: np.ndarray, canvas_shape) -> np.ndarray:
    """The canvas coordinates that lie in the block (not in the padding)."""
    coords_N3 = np.asarray(coords_N3, np.int64).reshape(-1, 3)
    hi = np.asarray(canvas_shape) - self.hi
    return coords_N3[np.all((coords_N3 >= self.lo) & (coords_N3 < hi), axis=1)]
