"""Where a segmentation's errors lie: VI and ARE by distance to its block's edge.

FFN cannot centre a FOV within half a FOV of its canvas's edge, so objects in that shell are
labelled only by the edges of FOVs further in. This prints, for each segmentation written by
``infer.py`` (it records its ``offset_zyx``), VI (split / merge) and ARE against the truth over
the whole block and over shells of voxels at a given distance from the block's nearest face; with
``--reference`` (a segmentation of the whole volume, e.g. Google's published one) the same box
and shells of that volume are scored beside it. The last line is one JSON object.

  python bench/border_study.py --truth ../shared/data/fib25_training_sample2/labels.zarr \\
      --reference ../shared/data/google_ffn_fib25/official_segmentation_training_sample2.zarr \\
      runs/c100n/segmentation.zarr runs/c100c/segmentation.zarr

Distances are in voxels along z, y and x (the minimum over the six faces); the default shells
are 0-8, 8-16 (the half-FOV shell of FIB-25's 33^3 FOV), 16-32, 32-48 and 48 on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ffn_jax import evaluation  # noqa: E402
from ffn_jax.data import volumes  # noqa: E402
from ffn_jax.errors import UserError  # noqa: E402


def edge_distance(shape) -> np.ndarray:
  """Each voxel's distance (in voxels) to the nearest face of a block of ``shape`` (zyx)."""
  axes = [np.minimum(np.arange(n), n - 1 - np.arange(n)) for n in shape]
  return np.minimum.reduce(np.meshgrid(*axes, indexing="ij"))


def score(seg: np.ndarray, truth: np.ndarray) -> dict:
  m = evaluation.evaluate_segmentation(seg, truth)
  return {k: round(float(m[k]), 4) for k in ("vi", "vi_split", "vi_merge", "are")}


def study(seg: np.ndarray, truth: np.ndarray, shells) -> dict:
  dist = edge_distance(seg.shape)
  out = {"all": score(seg, truth)}
  for lo, hi in shells:  # hi None: to the centre
    sel = (dist >= lo) if hi is None else (dist >= lo) & (dist < hi)
    if sel.any():
      out[f"{lo}-{'' if hi is None else hi}"] = {**score(seg[sel], truth[sel]),
                                                 "fraction": round(float(sel.mean()), 3)}
  return out


def _shells(text: str):
  edges = [int(v) for v in text.split(",")]
  if edges != sorted(set(edges)) or edges[0] != 0:
    raise UserError(f"--shells must be increasing distances starting at 0, got {text!r}")
  return list(zip(edges, edges[1:] + [None]))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("segmentations", nargs="+",
                 help="infer.py outputs (they record offset_zyx) or whole-volume segmentations")
  p.add_argument("--truth", required=True, help="the ground-truth label volume")
  p.add_argument("--reference", default="", help="a whole-volume segmentation scored beside each")
  p.add_argument("--shells", default="0,8,16,32,48", help="shell edges in voxels (default %(default)s)")
  args = p.parse_args(argv)
  shells = _shells(args.shells)
  truth = volumes.open_volume(args.truth)
  reference = volumes.open_volume(args.reference) if args.reference else None
  results = {}
  for path in args.segmentations:
    seg = volumes.open_volume(path)
    offset = seg.offset_zyx()
    if offset is None and tuple(seg.shape) == tuple(truth.shape):
      offset = (0, 0, 0)  # a whole-volume segmentation (e.g. Google's published one)
    if offset is None:
      raise UserError(f"{path} records no offset_zyx and is not the truth's shape "
                      f"{tuple(truth.shape)}; pass infer.py outputs or whole volumes")
    box = (tuple(offset), tuple(seg.shape))
    t = truth.read(*box)
    rows = {"segmentation": study(seg.read(), t, shells)}
    if reference is not None:
      rows["reference"] = study(reference.read(*box), t, shells)
    results[path] = {"offset_zyx": list(box[0]), "shape_zyx": list(box[1]), **rows}
    print(f"{path}: box start {box[0]} size {box[1]} (zyx)")
    for shell in rows["segmentation"]:
      line = f"  {shell:>6}"
      for name, r in rows.items():
        s = r[shell]
        line += (f" | {name} VI {s['vi']:.3f} ({s['vi_split']:.3f} split / "
                 f"{s['vi_merge']:.3f} merge) ARE {s['are']:.3f}")
      frac = rows["segmentation"][shell].get("fraction")
      print(line + (f" | {frac:.0%} of voxels" if frac is not None else ""))
  print(json.dumps(results))
  return results


if __name__ == "__main__":
  from ffn_jax.cli import clean_errors
  with clean_errors():
    main()
