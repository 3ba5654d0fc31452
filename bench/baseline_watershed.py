"""A classical baseline any trained FFN must beat: seeded 3-D watershed on the smoothed image.

  python bench/baseline_watershed.py --dataset gala
  python bench/baseline_watershed.py --dataset fib25 --test-start-zyx 125,75,75 --test-size-zyx 100,100,100

The method: smooth the image (Gaussian, ``sigma`` voxels); normalize it by the volume's own mean
and sd (so thresholds transfer between volumes of different contrast); seeds are the connected
components of ``smoothed > seed_threshold`` (in sd above the mean) of at least ``min_seed``
voxels; every voxel is then flooded from the seeds over the inverted smoothed image (membranes are
dark, so they become the ridges): ``scipy.ndimage.watershed_ift``. No voxel stays unlabelled.

Parameters are chosen by grid search on the training volume only (best VI against its labels),
then applied once to the held-out test volume: the split rules of ``../shared/data/README.md``.
Scores use ``ffn_jax.evaluation`` with the defaults of ``python -m ffn_jax.evaluate`` (truth 0
ignored, prediction 0 one segment). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import emit_json, rounded  # noqa: E402
from ffn_jax import evaluation  # noqa: E402
from ffn_jax.data import volumes  # noqa: E402

DATA = os.environ.get("FFN_SHARED_DATA") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")

# Training and test boxes (zyx start, size; size 0 = to the end) per dataset, by the data rules.
DATASETS = {
    "gala": {"train": ("gala_train", (0, 0, 0), (0, 0, 0)),
             "test": ("gala_test", (0, 0, 0), (0, 0, 0))},
    "fib25": {"train": ("fib25_training_sample2", (0, 0, 0), (100, 0, 0)),
              "test": ("fib25_training_sample2", (125, 75, 75), (100, 100, 100))},
}
GRID = {"sigma": (0.5, 1.0, 1.5, 2.0, 3.0),
        "seed_threshold": (-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
        "min_seed": (0, 50, 200)}


def read_box(folder: str, name: str, start, size) -> np.ndarray:
  vol = volumes.open_volume(os.path.join(DATA, folder, name))
  size = [s if s > 0 else d - a for s, a, d in zip(size, start, vol.shape)]
  return vol.read(start, size)


def smoothed(image: np.ndarray, sigma: float) -> np.ndarray:
  """The image smoothed and normalized to mean 0, sd 1 (over the volume)."""
  s = ndimage.gaussian_filter(image.astype(np.float32), sigma) if sigma > 0 else \
      image.astype(np.float32)
  return (s - s.mean()) / max(float(s.std()), 1e-6)


def watershed(smooth_ZYX: np.ndarray, seed_threshold: float, min_seed: int) -> np.ndarray:
  """Seeded watershed of a normalized smoothed image; returns uint32 segment IDs (0 = none)."""
  seeds, n = ndimage.label(smooth_ZYX > seed_threshold)
  if min_seed > 0 and n:
    sizes = np.bincount(seeds.ravel())
    small = sizes < min_seed
    small[0] = False
    seeds[small[seeds]] = 0
    seeds, n = ndimage.label(seeds > 0)
  if n == 0:
    return np.zeros(smooth_ZYX.shape, np.uint32)
  lo, hi = float(smooth_ZYX.min()), float(smooth_ZYX.max())
  # Inverted (membranes high) and quantized to uint16, as watershed_ift needs.
  relief = np.round((hi - smooth_ZYX) / max(hi - lo, 1e-6) * 65535).astype(np.uint16)
  return ndimage.watershed_ift(relief, seeds.astype(np.int32)).astype(np.uint32)


def score(seg: np.ndarray, truth: np.ndarray) -> dict:
  m = evaluation.evaluate_segmentation(seg, truth)
  return {k: m[k] for k in ("vi", "vi_split", "vi_merge", "are", "fraction_labelled",
                            "segments_pred")}


def grid_search(image, truth, grid=GRID, log=print) -> tuple[dict, list[dict]]:
  """Every parameter combination scored on (image, truth); returns (best params, all rows)."""
  rows = []
  for sigma in grid["sigma"]:
    smooth = smoothed(image, sigma)
    for t, min_seed in itertools.product(grid["seed_threshold"], grid["min_seed"]):
      params = {"sigma": sigma, "seed_threshold": t, "min_seed": min_seed}
      rows.append({**params, **score(watershed(smooth, t, min_seed), truth)})
  best = min(rows, key=lambda r: r["vi"])
  log(f"grid: {len(rows)} settings; best on training data: VI {best['vi']:.3f} at "
      f"sigma {best['sigma']}, seed_threshold {best['seed_threshold']}, "
      f"min_seed {best['min_seed']}")
  return {k: best[k] for k in ("sigma", "seed_threshold", "min_seed")}, rows


def run_baseline(train_image, train_truth, test_image, test_truth, grid=GRID, log=print) -> dict:
  """Chooses the parameters on the training pair, scores them on the test pair."""
  params, rows = grid_search(train_image, train_truth, grid, log)
  best_train = min(rows, key=lambda r: r["vi"])
  seg = watershed(smoothed(test_image, params["sigma"]), params["seed_threshold"],
                  params["min_seed"])
  return {"params": params, "train": {k: best_train[k] for k in score(seg, test_truth)},
          "test": score(seg, test_truth), "grid_size": len(rows), "segmentation": seg}


def _zyx(text: str):
  values = tuple(int(v) for v in text.split(","))
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f"expected Z,Y,X, got {text!r}")
  return values


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", choices=sorted(DATASETS), default="gala")
  p.add_argument("--test-start-zyx", type=_zyx, default=None, help="test box start (z,y,x)")
  p.add_argument("--test-size-zyx", type=_zyx, default=None, help="test box size (z,y,x)")
  p.add_argument("--train-start-zyx", type=_zyx, default=None, help="training box start")
  p.add_argument("--train-size-zyx", type=_zyx, default=None, help="training box size")
  p.add_argument("--out", default="", help="write the test segmentation here (zarr)")
  args = p.parse_args(argv)
  ds = DATASETS[args.dataset]
  t0 = time.perf_counter()
  tr_folder, tr_start, tr_size = ds["train"]
  te_folder, te_start, te_size = ds["test"]
  tr_start, tr_size = args.train_start_zyx or tr_start, args.train_size_zyx or tr_size
  te_start, te_size = args.test_start_zyx or te_start, args.test_size_zyx or te_size
  if args.dataset == "fib25" and te_start[0] < 125:
    raise SystemExit("error: FIB-25 evaluation boxes must lie at z >= 125 (data rules)")
  train = [read_box(tr_folder, n, tr_start, tr_size) for n in ("image.zarr", "labels.zarr")]
  test = [read_box(te_folder, n, te_start, te_size) for n in ("image.zarr", "labels.zarr")]
  result = run_baseline(train[0], train[1], test[0], test[1])
  seg = result.pop("segmentation")
  if args.out:
    volumes.write_zarr(args.out, seg, attrs={"offset_zyx": list(te_start),
                                             "baseline": "seeded watershed", **result["params"]})
  print(f"{'volume':<10} {'VI':>7} {'split':>7} {'merge':>7} {'ARE':>7} {'segments':>9}")
  for name in ("train", "test"):
    m = result[name]
    print(f"{name:<10} {m['vi']:7.3f} {m['vi_split']:7.3f} {m['vi_merge']:7.3f} {m['are']:7.3f} "
          f"{m['segments_pred']:9d}")
  emit_json(rounded({"dataset": args.dataset, "train_box": [tr_start, tr_size],
                     "test_box": [te_start, te_size], **result,
                     "wall_s": time.perf_counter() - t0}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
