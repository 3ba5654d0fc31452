"""How the stitching rule moves a tiled segmentation: restitched in memory from the kept tiles.

  python bench/stitch_study.py --tiled runs/s1/t100o48 --reference runs/s1/single/segmentation.zarr \
    --rules 100,0.6,0 100,0.6,8 100,0.6,16 100,0.51,16 [--truth ../shared/data/.../labels.zarr]

``--tiled`` is the workdir of a finished tiled ``infer.py`` run (its tiles and ``tiling.json``);
each rule ``MIN_VOXELS,MIN_FRACTION,MARGIN[,JOIN_FRACTION]`` (``stitch.min_overlap_voxels``,
``stitch.min_fraction``, ``stitch.margin``, ``stitch.join_fraction``) is stitched with the code
``infer.py`` uses (``tiling.stitch_tables``), nothing is written. Each result is compared with
``--reference``, normally a single-pass segmentation of the same box: VI between the two, how
many reference segments (>= 1000 voxels) the stitched one splits and why (``explain_splits``:
declined by the rule's thresholds, split inside one tile, left unlabelled, or no shared
voxels), and how many stitched segments merge reference ones; with ``--truth``, VI / ARE
against the labels (all voxels, unlabelled as one segment, as ``ffn_jax.evaluate --truth-zero
as-segment``) and ``neurons_split``: labelled objects the reference keeps whole and the stitched
result splits (``evaluation.split_anew``). A reference or truth larger
than the box is cropped to it (volume coordinates: the box's ``bbox_start_zyx`` less the
volume's recorded offset). Tune the rule against a single pass on training data (e.g. the
unlabelled fib25_training_sample1), not on evaluation crops. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from configs import fib25_infer  # noqa: E402
from ffn_jax import evaluation  # noqa: E402
from ffn_jax.data import volumes  # noqa: E402
from ffn_jax.inference import runner, tiled, tiling  # noqa: E402

JOIN_FRACTION = fib25_infer.get_config().stitch.join_fraction


def load_tiles(workdir: str):
  """(tiles, box start, box size, reader) of a tiled run's workdir."""
  with open(os.path.join(workdir, "tiling.json")) as f:
    plan = json.load(f)
  tiles = [tiling.Tile.from_json(t) for t in plan["tiles"]]
  start = tuple(plan["identity"]["bbox_start_zyx"])
  size = tuple(plan["identity"]["bbox_size_zyx"])
  arrays = [volumes.open_volume(os.path.join(workdir, "tiles", t.name, runner.SEGMENTATION)).read()
            for t in tiles]

  def read(k: int, at, shape) -> np.ndarray:
    lo = [a - b for a, b in zip(at, tiles[k].start)]
    return arrays[k][tuple(slice(a, a + n) for a, n in zip(lo, shape))]
  return tiles, start, size, read


def stitched(tiles, start, size, read, min_overlap_voxels, min_fraction, margin, links=()):
  """The stitched volume of the box, in memory, its per-tile tables local -> global ID, and the
  number of merges by the rule."""
  result = tiling.stitch_tables(tiles, read, start, size, min_overlap_voxels, min_fraction,
                                margin, links)
  out = np.zeros(size, np.uint64)
  for core_start, core in tiling.cores(tiles, result.tables, read):
    out[tuple(slice(a - b, a - b + n) for a, b, n in zip(core_start, start, core.shape))] = core
  return out, result.tables, len(result.merges)


SPLIT_REASONS = ("rule", "within_tile", "unlabelled", "no_shared_voxels")


def explain_splits(tiles, start, size, read, tables, reference, margin, min_size=1000,
                   min_part=0.1) -> dict:
  """Why the stitched result cuts each reference object it splits (as
  ``evaluation.split_objects`` counts them), judged on the object's two largest parts:

  - ``rule``: the parts come from different tiles whose segments share voxels in the region the
    rule compares (``tiling.match_region``), and the thresholds declined the pair;
  - ``within_tile``: one tile's own segmentation holds both parts in its core;
  - ``unlabelled``: one part is left unlabelled (0) in the output;
  - ``no_shared_voxels``: the parts come from different tiles whose segments share no voxel
    where the rule compares them (the tiles segmented the object differently there).

  Returns {reason: objects} with every reason present (0 when none).
  """
  # (reference ID, global ID) -> voxels, and global ID -> {(tile, local ID)} inside each object.
  ref_ids, glob_ids, tile_ids, local_ids, counts = [], [], [], [], []
  for k, t in enumerate(tiles):
    local = read(k, t.core_start, t.core_size).astype(np.int64)
    ref = reference[tuple(slice(a - b, a - b + n)
                          for a, b, n in zip(t.core_start, start, t.core_size))].astype(np.int64)
    keys, n = np.unique(np.stack([ref.ravel(), local.ravel()]), axis=1, return_counts=True)
    ref_ids.append(keys[0])
    local_ids.append(keys[1])
    glob_ids.append(tables[k][keys[1]].astype(np.int64))
    tile_ids.append(np.full(len(n), k))
    counts.append(n)
  ref_ids, glob_ids, tile_ids, local_ids, counts = map(
      np.concatenate, (ref_ids, glob_ids, tile_ids, local_ids, counts))
  reasons = dict.fromkeys(SPLIT_REASONS, 0)
  for r in np.unique(ref_ids[ref_ids > 0]):
    rows = ref_ids == r
    total = counts[rows].sum()
    parts, part_inv = np.unique(glob_ids[rows], return_inverse=True)
    part_sizes = np.bincount(part_inv, weights=counts[rows])
    if total < min_size or np.sum(part_sizes >= min_part * total) < 2:
      continue
    p, q = parts[np.argsort(-part_sizes, kind="stable")[:2]]
    if 0 in (p, q):
      reasons["unlabelled"] += 1
      continue
    src = {g: {(int(k), int(a)) for k, a in zip(tile_ids[rows][glob_ids[rows] == g],
                                               local_ids[rows][glob_ids[rows] == g])}
           for g in (p, q)}
    if {k for k, _ in src[p]} & {k for k, _ in src[q]}:
      reasons["within_tile"] += 1
      continue
    regions = [(i, a, j, b, tiling.match_region(tiles[i], tiles[j], start, size, margin))
               for i, a in src[p] for j, b in src[q]]
    shared = any(np.any((read(i, *region) == a) & (read(j, *region) == b))
                 for i, a, j, b, region in regions if region is not None)
    reasons["rule" if shared else "no_shared_voxels"] += 1
  return reasons


def read_box(path: str, start, size) -> np.ndarray:
  vol = volumes.open_volume(path)
  if tuple(vol.shape) == tuple(size):
    return vol.read()
  offset = vol.offset_zyx() or (0, 0, 0)
  return vol.read(tuple(a - o for a, o in zip(start, offset)), size)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiled", required=True, help="workdir of a finished tiled infer.py run")
  ap.add_argument("--reference", required=True, help="segmentation to compare with")
  ap.add_argument("--truth", default="", help="ground-truth labels (optional)")
  ap.add_argument("--rules", nargs="+", default=["100,0.6,0"],
                  help="MIN_VOXELS,MIN_FRACTION,MARGIN[,JOIN_FRACTION] (join: tile_mode=continue "
                       "runs; default that of configs/fib25_infer.py)")
  args = ap.parse_args(argv)
  tiles, start, size, read = load_tiles(args.tiled)
  reference = read_box(args.reference, start, size)
  truth = read_box(args.truth, start, size) if args.truth else None
  rows = []
  if truth is not None:
    m = evaluation.evaluate_segmentation(reference, truth)
    rows.append({"rule": "reference", "vi": m["vi"], "vi_split": m["vi_split"],
                 "vi_merge": m["vi_merge"], "are": m["are"], "segments": m["segments_pred"]})
  for rule in args.rules:
    voxels, fraction, margin, *join = rule.split(",")
    t0 = time.perf_counter()
    links = tiled.prior_links(args.tiled, tiles, read, int(voxels),
                              float(join[0]) if join else JOIN_FRACTION)
    seg, tables, merges = stitched(tiles, start, size, read, int(voxels), float(fraction),
                                   int(margin), links)
    vs = evaluation.evaluate_segmentation(seg, reference)
    row = {"rule": rule, "merges": merges, "segments": vs["segments_pred"],
           "vi_vs_reference": vs["vi"], "split_vs_reference": vs["vi_split"],
           "merge_vs_reference": vs["vi_merge"],
           "reference_objects_split": evaluation.split_objects(reference, seg),
           "objects_merging_reference": evaluation.split_objects(seg, reference),
           "stitch_s": time.perf_counter() - t0}
    row.update({f"split_{k}": v for k, v in explain_splits(tiles, start, size, read, tables,
                                                           reference, int(margin)).items()})
    if truth is not None:
      m = evaluation.evaluate_segmentation(seg, truth)
      row.update(vi=m["vi"], vi_split=m["vi_split"], vi_merge=m["vi_merge"], are=m["are"],
                 neurons_split=evaluation.split_anew(truth, reference, seg))
    rows.append(row)

  print(f"tiled run {args.tiled}: {len(tiles)} tiles, box {start} + {size}; reference "
        f"{args.reference}; CPU {_common.cpu_model()}")
  cols = ["rule", "merges", "segments", "vi_vs_reference", "split_vs_reference",
          "merge_vs_reference", "reference_objects_split", "objects_merging_reference"]
  cols += [f"split_{k}" for k in SPLIT_REASONS]
  if truth is not None:
    cols += ["vi", "vi_split", "vi_merge", "are", "neurons_split"]
  print(" | ".join(cols))
  for r in rows:
    print(" | ".join("-" if r.get(c) is None else
                     f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
  _common.emit_json({"benchmark": "stitch_study", "tiled": args.tiled, "tiles": len(tiles),
                     "box_start_zyx": list(start), "box_size_zyx": list(size),
                     "cpu": _common.cpu_model(), "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
