"""Evaluates a segmentation against ground truth; prints one JSON object (see ffn_jax.evaluation).

Usage:
  python -m ffn_jax.evaluate --segmentation seg.zarr --truth labels.zarr \
      [--bbox-start-zyx 93,93,93 --bbox-size-zyx 64,64,64] \
      [--pred-unlabelled {as-segment,ignore,singletons}] [--truth-zero {ignore,as-segment}] \
      [--voxel-size-zyx 10,10,10] [--skeleton-min-nodes 5] [--skeleton-dust-voxels 1000] \
      [--no-skeletons] [--image image.zarr --preview compare.png] [--summary]

Besides VI and adapted Rand error it reports skeleton scores (``ffn_jax.skeleton_metrics``):
the truth box is skeletonized with kimimaro (cached on disk, ``ffn_jax.skeletons``), and
``erl``, ``erl_voxels``, ``erl_max``, ``skeleton_length``, ``merges``, ``splits`` and ``omitted``
are added, lengths in the units of ``--voxel-size-zyx``; ``skeleton_cache`` says whether the
skeletons came from the cache and ``skeleton_s`` how long they and their scores took.

A segmentation written by ``infer.py`` records where it sits in the volume (``offset_zyx`` in its
``.zattrs``): the truth is cropped to match, and ``--bbox-*`` (truth coordinates) may narrow it.
``--preview PNG`` (with ``--image``, the volume both were drawn on) writes z slices of image,
truth and segmentation side by side; ``--summary`` prints one readable line before the JSON.
Volume specs are anything ``ffn_jax.data.volumes.open_volume`` accepts: a zarr/n5 folder,
``file.h5:dataset`` or a tensorstore JSON spec. Bad input prints one ``error: ...`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from ffn_jax import evaluation, skeleton_metrics, skeletons
from ffn_jax.errors import UserError


class _Parser(argparse.ArgumentParser):
  """Reports bad arguments as a UserError (one line, exit 2) instead of usage + message."""

  def error(self, message):
    raise UserError(f"{message} (see --help)")


def _zyx(text: str, cast=int, what: str = "integers") -> tuple:
  try:
    values = tuple(cast(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f"expected three {what} Z,Y,X, got {text!r}")
  return values


def _voxel_size(text: str) -> tuple[float, float, float]:
  values = _zyx(text, float, "positive numbers")
  if not all(math.isfinite(v) and v > 0 for v in values):
    raise argparse.ArgumentTypeError(f"expected three positive numbers Z,Y,X, got {text!r}")
  return values


def _at_least(low: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = low - 1
    if value < low:
      raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value
  return parse


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog="python -m ffn_jax.evaluate",
      description="Variation of information (bits), adapted Rand error and skeleton scores "
                  "(expected run length, merges, splits) of a segmentation against ground truth, "
                  "printed as one JSON object. Defaults: every voxel with truth != 0 counts, and "
                  "prediction 0 (unlabelled) counts as one segment.")
  p.add_argument("--segmentation", required=True, help="predicted segmentation volume spec")
  p.add_argument("--truth", required=True, help="ground-truth label volume spec")
  p.add_argument("--bbox-start-zyx", type=_zyx, default=None,
                 help="evaluate only this box, in truth coordinates: its start Z,Y,X (default: "
                      "the segmentation's recorded offset_zyx, else 0,0,0)")
  p.add_argument("--bbox-size-zyx", type=_zyx, default=None,
                 help="box size Z,Y,X (default: to the end of the segmentation's recorded box, "
                      "else of the volume)")
  p.add_argument("--pred-unlabelled", choices=evaluation.PRED_UNLABELLED_MODES,
                 default="as-segment",
                 help="prediction ID 0: one segment (as-segment, the default), left out (ignore), "
                      "or each voxel its own segment (singletons, as CREMI)")
  p.add_argument("--truth-zero", choices=evaluation.TRUTH_ZERO_MODES, default="ignore",
                 help="truth ID 0: left out (ignore, the default; no effect when truth has no "
                      "0) or an ordinary segment (as-segment)")
  p.add_argument("--voxel-size-zyx", type=_voxel_size, default=(1.0, 1.0, 1.0),
                 help="physical voxel size Z,Y,X for the skeleton scores (default 1,1,1: lengths "
                      "in voxels; FIB-25: 10,10,10 nm)")
  p.add_argument("--skeleton-min-nodes", type=_at_least(1),
                 default=skeleton_metrics.DEFAULT_MIN_NODES,
                 help="skeleton nodes a segment needs to count as holding a skeleton, for merges "
                      "and splits (default %(default)s)")
  p.add_argument("--skeleton-dust-voxels", type=_at_least(0),
                 default=skeletons.SkeletonParams.dust_voxels,
                 help="truth objects with fewer voxels get no skeleton (default %(default)s)")
  p.add_argument("--no-skeletons", dest="skeletons", action="store_false",
                 help="skip the skeleton scores (ERL, merges, splits)")
  p.add_argument("--image", default="", help="the image volume spec (for --preview)")
  p.add_argument("--preview", default="",
                 help="write a PNG of z slices: image, truth and segmentation side by side")
  p.add_argument("--summary", action="store_true",
                 help="print one readable line before the JSON object")
  return p


def _fmt(v) -> str:
  return str(tuple(int(a) for a in v))


def _boxes(args, seg, truth):
  """(start, size) of the box to score in truth coordinates, and where it starts in ``seg``.

  A segmentation that records ``offset_zyx`` (``infer.py`` writes it) sits at that offset in the
  truth: by default its whole extent is scored, and a ``--bbox-*`` must lie inside it. Without a
  recorded offset the segmentation is the truth's shape, or just the ``--bbox-*`` box.
  """
  shape = np.asarray(truth.shape)
  offset = seg.offset_zyx()
  if offset is not None:
    lo, hi = np.asarray(offset), np.asarray(offset) + seg.shape
    if np.any(lo < 0) or np.any(hi > shape):
      raise UserError(f"--segmentation {seg.name} records offset_zyx {_fmt(lo)} and has shape "
                      f"{_fmt(seg.shape)} (zyx): that box lies outside --truth of shape "
                      f"{_fmt(shape)}; is it a segmentation of this volume?")
    start = np.asarray(args.bbox_start_zyx or lo)
    size = hi - start if args.bbox_size_zyx is None else np.asarray(args.bbox_size_zyx)
    if np.any(size <= 0) or np.any(start < lo) or np.any(start + size > hi):
      raise UserError(f"bbox start {_fmt(start)} size {_fmt(size)} (zyx) is empty or outside the "
                      f"segmentation's box (start {_fmt(lo)} size {_fmt(seg.shape)}, from its "
                      "recorded offset_zyx)")
    return start, size, start - lo
  start = np.asarray(args.bbox_start_zyx or (0, 0, 0))
  size = shape - start if args.bbox_size_zyx is None else np.asarray(args.bbox_size_zyx)
  if np.any(start < 0) or np.any(size <= 0) or np.any(start + size > shape):
    raise UserError(f"bbox start {_fmt(start)} size {_fmt(size)} (zyx) is "
                    f"empty or outside the volumes of shape {_fmt(shape)}")
  # A segmentation of just the box is compared with the truth's box; one of the truth's shape is
  # cut to the box like the truth.
  if seg.shape == truth.shape:
    return start, size, start
  if args.bbox_size_zyx is None or tuple(seg.shape) != tuple(size.tolist()):
    raise UserError(f"--segmentation has shape {seg.shape} (zyx) and --truth {truth.shape}; "
                    "they must be equal, or the segmentation must record offset_zyx (as "
                    "infer.py's do) or have the shape of --bbox-size-zyx (a segmentation of "
                    "just that box)")
  return start, size, np.zeros(3, int)


def run(argv: list[str] | None = None) -> dict:
  """Parses arguments, reads both volumes' box and returns the metrics with the options used."""
  from ffn_jax.data import volumes  # local: tensorstore is a slow import
  args = _parser().parse_args(argv)
  if args.preview and not args.image:
    raise UserError("--preview needs --image (the volume the segmentation was made from)")
  seg = volumes.open_volume(args.segmentation)
  truth = volumes.open_volume(args.truth)
  for flag, vol in (("--segmentation", seg), ("--truth", truth)):
    if not (vol.dtype == np.bool_ or np.issubdtype(vol.dtype, np.integer)):
      raise UserError(f"{flag} {vol.name} has dtype {vol.dtype}; label volumes must hold "
                      "integer IDs")
  start, size, seg_start = _boxes(args, seg, truth)
  seg_box, truth_box = seg.read(seg_start, size), truth.read(start, size)
  result = evaluation.evaluate_segmentation(seg_box, truth_box,
                                            pred_unlabelled=args.pred_unlabelled,
                                            truth_zero=args.truth_zero)
  if args.skeletons:
    t0 = time.perf_counter()
    params = skeletons.SkeletonParams(voxel_size_zyx=args.voxel_size_zyx,
                                      dust_voxels=args.skeleton_dust_voxels)
    truth_skeletons, cached = skeletons.load_or_skeletonize(truth_box, params)
    result.update(skeleton_metrics.evaluate_skeletons(
        seg_box, truth_skeletons, params.voxel_size_zyx, args.skeleton_min_nodes))
    result.update({"voxel_size_zyx": list(params.voxel_size_zyx),
                   "skeleton_cache": "hit" if cached else "miss",
                   "skeleton_s": round(time.perf_counter() - t0, 3)})
  result.update({
      "segmentation": args.segmentation, "truth": args.truth,
      "bbox_start_zyx": start.tolist(), "bbox_size_zyx": size.tolist(),
  })
  if args.preview:
    from ffn_jax.inference import preview
    image = volumes.open_volume(args.image)
    if tuple(image.shape) != tuple(truth.shape):
      raise UserError(f"--image {image.name} has shape {tuple(image.shape)}, --truth "
                      f"{tuple(truth.shape)} (zyx): the image the truth labels")
    preview.write_comparison(args.preview, image.read(start, size), truth_box, seg_box,
                             title=f"VI {result['vi']:.3f} (split {result['vi_split']:.3f}, "
                                   f"merge {result['vi_merge']:.3f})")
    result["preview"] = args.preview
  return result


def summary(result: dict) -> str:
  """One readable line of ``run``'s result."""
  text = (f"VI {result['vi']:.3f} (split {result['vi_split']:.3f}, merge "
          f"{result['vi_merge']:.3f}), adapted Rand error {result['are']:.3f}, "
          f"{100 * result['fraction_labelled']:.0f}% labelled")
  if result.get("erl") is not None:
    text += f", ERL {result['erl']:.1f} of {result['erl_max']:.1f}"
  if result.get("preview"):
    text += f"; image | truth | segmentation: {result['preview']}"
  return text


def main(argv: list[str] | None = None) -> None:
  result = run(argv)
  if "--summary" in (sys.argv[1:] if argv is None else argv):
    print(summary(result))
  print(json.dumps(result))


if __name__ == "__main__":
  from ffn_jax.cli import clean_errors
  with clean_errors():
    main(sys.argv[1:])
