"""How wide a halo ``tile_seeds=halo`` needs: each tile's seeds against one keyed pass's.

  python bench/seed_halo.py --config.checkpoint=runs/fib25_google \
    --config.image=$PWD/../shared/data/fib25_training_sample1/image.zarr \
    --config.bbox_start_zyx='(50,50,50)' --config.bbox_size_zyx='(150,150,150)' \
    --config.tile_size_zyx='(100,100,100)' --config.tile_overlap_zyx='(48,48,48)' \
    --halos 0 16 32 48 64

Any ``configs/fib25_infer.py`` override goes as ``--config.NAME=VALUE`` (``border_padding``,
``seed_policy``, ...). The seed policy runs once over the whole bbox keyed to volume coordinates
(``InferenceJob.seeds(bbox, keyed=True)``), then, for each halo, over every tile's block and that
halo (``InferenceJob.seeds(bbox, block=, halo=)``, as ``infer.py`` does with ``tile_seeds=halo``).
Per halo: tiles whose seed list equals the pass's share exactly, seeds the tiles add or lack
against it, the largest window's voxels and the median seconds per tile. Only the seed policy
runs (no FFN). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from ffn_jax.inference import job as job_lib  # noqa: E402
from ffn_jax.inference import padding, tiling  # noqa: E402


def block_of(seeds: np.ndarray, start, size) -> np.ndarray:
  inside = np.all((seeds >= start) & (seeds < np.add(start, size)), axis=1)
  return seeds[inside]


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--halos", type=int, nargs="+", default=[0, 16, 32, 48, 64])
  args, overrides = ap.parse_known_args(argv)
  config = _common.load_config("configs/fib25_infer.py", overrides)
  job = job_lib.InferenceJob.open(config)
  model, image_desc, bbox = job.model, job.image_desc, job.bbox()
  tiles = tiling.plan(bbox[0], bbox[1], config.tile_size_zyx, config.tile_overlap_zyx)
  border = padding.BorderPadding(config, model)
  t0 = time.perf_counter()
  whole = job.seeds(bbox, keyed=True)
  whole_s = time.perf_counter() - t0
  print(f"{image_desc}: bbox {bbox[0]} + {bbox[1]}, {len(tiles)} tiles of "
        f"{tuple(config.tile_size_zyx)}, border_padding={config.border_padding}, "
        f"{config.seed_policy}; one keyed pass: {len(whole)} seeds in {whole_s:.1f} s; "
        f"CPU {_common.cpu_model()}")
  print("halo | tiles equal | seeds added | seeds lacking | largest window (voxels) | s per tile")
  rows = []
  for halo in args.halos:
    equal = added = lacking = 0
    seconds, largest = [], 0
    for t in tiles:
      t1 = time.perf_counter()
      got = job.seeds(bbox, block=(t.start, t.size), halo=halo)
      seconds.append(time.perf_counter() - t1)
      want = block_of(whole, t.start, t.size)
      equal += int(np.array_equal(got, want))
      have, need = set(map(tuple, got)), set(map(tuple, want))
      added += len(have - need)
      lacking += len(need - have)
      lo, hi = job_lib.seed_window(border, bbox, (t.start, t.size), halo)
      largest = max(largest, int(np.prod(hi - lo)))
    row = {"halo": halo, "tiles_equal": equal, "tiles": len(tiles), "seeds_added": added,
           "seeds_lacking": lacking, "largest_window_voxels": largest,
           "median_s_per_tile": statistics.median(seconds)}
    rows.append(row)
    print(f"{halo} | {equal} / {len(tiles)} | {added} | {lacking} | {largest:,} | "
          f"{row['median_s_per_tile']:.1f}")
  result = {"benchmark": "seed_halo", "bbox_start_zyx": list(bbox[0]),
            "bbox_size_zyx": list(bbox[1]), "seeds_whole": len(whole), "whole_s": whole_s,
            "rows": rows, **_common.machine()}
  _common.emit_json(result)
  return result


if __name__ == "__main__":
  main()
