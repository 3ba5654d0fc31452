"""The 16 FFN augmentation variants: z/y/x reflections (8) times the y<->x transpose (2).

A variant is an int in [0, 16): bit 0 flips z, bit 1 flips y, bit 2 flips x, bit 3 transposes
y and x (applied after the flips). Works on [z, y, x, ...] arrays.
"""
from __future__ import annotations

import numpy as np

NUM_VARIANTS = 16


def apply(array_ZYX, variant: int) -> np.ndarray:
  out = array_ZYX
  for axis in range(3):
    if variant >> axis & 1:
      out = np.flip(out, axis=axis)
  if variant >> 3 & 1:
    out = np.swapaxes(out, 1, 2)
  return out


def invert(array_ZYX, variant: int) -> np.ndarray:
  out = array_ZYX
  if variant >> 3 & 1:
    out = np.swapaxes(out, 1, 2)
  for axis in range(3):
    if variant >> axis & 1:
      out = np.flip(out, axis=axis)
  return out
