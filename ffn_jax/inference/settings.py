"""From an inference config to what the canvas needs: the flood options (probabilities checked),
the block, the conv route and the seed policy. Nothing here reads a volume or a checkpoint.

The fields are ``infer.py``'s (``configs/fib25_infer.py``); the training eval's ``config.eval``
holds the same flood settings (``configs/fib25_infer.add_flood_settings``).
"""
from __future__ import annotations

import numpy as np

from ffn_jax.errors import UserError
from ffn_jax.inference import options as options_lib
from ffn_jax.inference import seed as seed_lib


def flood_options(config) -> options_lib.InferenceOptions:
  """The canvas options of ``config.inference``; raises UserError for values that are not
  probabilities, a bad ``min_boundary_dist_zyx``, ``batch_size`` or ``pad_batches``."""
  o = config.inference
  for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
    if not 0.0 < float(o[name]) < 1.0:
      raise UserError(f"inference.{name} must be a probability in (0, 1), got {o[name]}")
  if len(o.min_boundary_dist_zyx) != 3 or min(o.min_boundary_dist_zyx) < 0:
    raise UserError(f"inference.min_boundary_dist_zyx needs 3 values >= 0, got "
                    f"{o.min_boundary_dist_zyx}")
  if int(config.batch_size) < 1:
    raise UserError(f"batch_size must be >= 1, got {config.batch_size}")
  if config.pad_batches not in ("auto", "buckets", "full"):
    raise UserError(f"pad_batches must be 'auto', 'buckets' or 'full', got "
                    f"{config.pad_batches!r}")
  return options_lib.InferenceOptions(
      init_activation=float(o.init_activation), pad_value=float(o.pad_value),
      move_threshold=float(o.move_threshold), segment_threshold=float(o.segment_threshold),
      min_segment_size=int(o.min_segment_size),
      min_boundary_dist_zyx=tuple(int(v) for v in o.min_boundary_dist_zyx),
      disco_seed_threshold=float(o.disco_seed_threshold))


def resolve_bbox(volume_shape, start_zyx, size_zyx):
  """Validated (start, size) inside the volume; size entries <= 0 run to the volume's end."""
  start = tuple(int(v) for v in start_zyx) if len(start_zyx) else (0, 0, 0)
  size = tuple(int(v) for v in size_zyx) if len(size_zyx) else (0, 0, 0)
  if len(start) != 3 or len(size) != 3:
    raise UserError(f"bbox_start_zyx and bbox_size_zyx need 3 values (z, y, x); got {start_zyx} "
                    f"and {size_zyx}")
  size = tuple(s if s > 0 else d - a for s, a, d in zip(size, start, volume_shape))
  if any(a < 0 for a in start) or any(s <= 0 for s in size) or any(
      a + s > d for a, s, d in zip(start, size, volume_shape)):
    raise UserError(f"bounding box start {start} size {size} (zyx) lies outside the volume of "
                    f"shape {tuple(volume_shape)}")
  return start, size


def compute_route(config, trained_dtype: str = "float32") -> tuple[str, str, str]:
  """(conv route, compute dtype, why) for inference: ``compute_dtype``, or when it is '' the
  dtype the checkpoint was trained with (``trained_dtype``)."""
  from ffn_jax import conv as conv_lib  # jax import only when the model runs
  dtype = str(config.get("compute_dtype", "")) or trained_dtype
  why = "" if config.get("compute_dtype", "") else f" (the checkpoint's: {trained_dtype})"
  route, dtype, reason = conv_lib.choose(str(config.conv_impl), dtype)
  return route, dtype, reason + why


def seed_coords(config, image: np.ndarray, mask: np.ndarray | None = None,
                origin_zyx=None) -> np.ndarray:
  """The seed positions of ``config``'s seed policy (``seed_policy``, ``seed_min_distance``,
  ``grid_step``, ``grid_offsets``, ``voxel_size_zyx``) on a normalized image; ``origin_zyx``
  (the image's volume position): keyed to volume coordinates (``seed`` module docstring)."""
  return seed_lib.make_seed_coords(
      str(config.seed_policy), image, mask, tuple(config.voxel_size_zyx),
      int(config.seed_min_distance), int(config.grid_step), tuple(config.grid_offsets),
      origin_zyx)
