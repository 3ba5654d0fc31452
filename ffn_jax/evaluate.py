"""Evaluates a segmentation against ground truth; prints one JSON object (see ffn_jax.evaluation).

Usage:
  python -m ffn_jax.evaluate --segmentation seg.zarr --truth labels.zarr \
      [--bbox-start-zyx 93,93,93 --bbox-size-zyx 64,64,64] \
      [--pred-unlabelled {as-segment,ignore,singletons}] [--truth-zero {ignore,as-segment}]

Volume specs are anything ``ffn_jax.data.volumes.open_volume`` accepts: a zarr/n5 folder,
``file.h5:dataset`` or a tensorstore JSON spec. Bad input prints one ``error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ffn_jax import evaluation
from ffn_jax.errors import UserError


class _Parser(argparse.ArgumentParser):
  """Reports bad arguments as a UserError (one line, exit 2) instead of usage + message."""

  def error(self, message):
    raise UserError(f"{message} (see --help)")


def _zyx(text: str) -> tuple[int, int, int]:
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f"expected three integers Z,Y,X, got {text!r}")
  return values


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="python -m ffn_jax.evaluate",
      description="Variation of information (bits) and adapted Rand error of a segmentation "
                  "against ground truth, printed as one JSON object. Defaults: every voxel with "
                  "truth != 0 counts, and prediction 0 (unlabelled) counts as one segment.")
  p.add_argument("--segmentation", required=True, help="predicted segmentation volume spec")
  p.add_argument("--truth", required=True, help="ground-truth label volume spec")
  p.add_argument("--bbox-start-zyx", type=_zyx, default=None,
                 help="evaluate only this box: its start Z,Y,X (default: 0,0,0)")
  p.add_argument("--bbox-size-zyx", type=_zyx, default=None,
                 help="box size Z,Y,X (default: from the start to the end of the volume)")
  p.add_argument("--pred-unlabelled", choices=evaluation.PRED_UNLABELLED_MODES,
                 default="as-segment",
                 help="prediction ID 0: one segment (as-segment, the default), left out (ignore), "
                      "or each voxel its own segment (singletons, as CREMI)")
  p.add_argument("--truth-zero", choices=evaluation.TRUTH_ZERO_MODES, default="ignore",
                 help="truth ID 0: left out (ignore, the default; no effect when truth has no "
                      "0) or an ordinary segment (as-segment)")
  return p


def run(argv: list[str] | None = None) -> dict:
  """Parses arguments, reads both volumes' box and returns the metrics with the options used."""
  from ffn_jax.data import volumes  # local: tensorstore is a slow import
  args = _parser().parse_args(argv)
  seg = volumes.open_volume(args.segmentation)
  truth = volumes.open_volume(args.truth)
  for flag, vol in (("--segmentation", seg), ("--truth", truth)):
    if not (vol.dtype == np.bool_ or np.issubdtype(vol.dtype, np.integer)):
      raise UserError(f"{flag} {vol.name} has dtype {vol.dtype}; label volumes must hold "
                      "integer IDs")
  shape = np.asarray(truth.shape)
  start = np.asarray(args.bbox_start_zyx or (0, 0, 0))
  size = shape - start if args.bbox_size_zyx is None else np.asarray(args.bbox_size_zyx)
  if np.any(start < 0) or np.any(size <= 0) or np.any(start + size > shape):
    raise UserError(f"bbox start {tuple(start.tolist())} size {tuple(size.tolist())} (zyx) is "
                    f"empty or outside the volumes of shape {tuple(shape.tolist())}")
  # A segmentation of just the box (what infer.py writes for a bbox) is compared with the
  # truth's box; one of the truth's shape is cut to the box like the truth.
  seg_start = start
  if seg.shape != truth.shape:
    if args.bbox_size_zyx is None or tuple(seg.shape) != tuple(size.tolist()):
      raise UserError(f"--segmentation has shape {seg.shape} (zyx) and --truth {truth.shape}; "
                      "they must be equal, or the segmentation must have the shape of "
                      "--bbox-size-zyx (a segmentation of just that box)")
    seg_start = np.zeros(3, int)
  result = evaluation.evaluate_segmentation(
      seg.read(seg_start, size), truth.read(start, size),
      pred_unlabelled=args.pred_unlabelled, truth_zero=args.truth_zero)
  result.update({
      "segmentation": args.segmentation, "truth": args.truth,
      "bbox_start_zyx": start.tolist(), "bbox_size_zyx": size.tolist(),
  })
  return result


def main(argv: list[str] | None = None) -> None:
  print(json.dumps(run(argv)))


if __name__ == "__main__":
  from ffn_jax.cli import clean_errors
  with clean_errors():
    main(sys.argv[1:])
