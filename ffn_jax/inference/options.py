"""Google's inference options (probabilities) and the float32 logit thresholds the canvas uses."""
from __future__ import annotations

import dataclasses

import numpy as np

from ffn_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """Google's InferenceOptions; thresholds are probabilities (converted to logits inside)."""
  init_activation: float = 0.95
  pad_value: float = 0.05
  move_threshold: float = 0.9
  segment_threshold: float = 0.6
  min_segment_size: int = 1000
  min_boundary_dist_zyx: tuple = (1, 1, 1)
  disco_seed_threshold: float = 0.0  # < 0 disables disconnected-seed freezing


def logit32(p: float) -> np.float32:
  """A probability threshold as the float32 logit Google's canvas compares against.

  Google stores options in float32 proto fields: p is rounded to float32, converted with a
  float64 logit and stored (rounded) as float32 again.
  """
  return np.float32(model_lib.logit(float(np.float32(p))))


class Thresholds:
  """The logit-space thresholds of one InferenceOptions."""

  def __init__(self, o: InferenceOptions):
    for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
      p = getattr(o, name)
      if not 0.0 < p < 1.0:
        raise ValueError(f"{name} must be a probability in (0, 1), got {p}")
    self.init = logit32(o.init_activation)
    self.pad = logit32(o.pad_value)
    self.move = logit32(o.move_threshold)
    self.segment = logit32(o.segment_threshold)
    # Google's movement policy gets logit(move_threshold) in float64 and compares the float32
    # face maxima against it in float64 (numpy 1.x scalar promotion).
    self.move_f64 = model_lib.logit(float(np.float32(o.move_threshold)))
    self.disco = float(o.disco_seed_threshold)
    self.min_size = int(o.min_segment_size)
    self.mbd = np.asarray(o.min_boundary_dist_zyx, np.int64)
