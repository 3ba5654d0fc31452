"""A classical baseline any trained FFN must beat: seeded 3-D watershed on the smoothed image.

  python bench/baseline_watershed.py --dataset gala
  python bench/baseline_watershed.py --dataset fib25 --test-start-zyx 125,150,0 --test-size-zyx 100,100,100
  python bench/baseline_watershed.py --dataset gala --methods hmax --sigmas 0.75   # a quick run
  python bench/baseline_watershed.py --dataset gala --grid old                     # the old baseline

The method: smooth the image (Gaussian, ``sigma`` voxels) and normalize it by the volume's own
mean and sd (so thresholds, in sd, transfer between volumes of different contrast); place seeds
by one of three rules; flood every voxel from the seeds over the inverted image (membranes are
dark, so they become the ridges) smoothed with ``flood_sigma`` (0: the raw image). No voxel
stays unlabelled. The seed rules (``method``):

- ``threshold``: 6-connected components of ``smoothed > seed_threshold``.
- ``hmax``: the h-maxima of the smoothed image, its maxima of dynamic >= ``h`` (sd): for every
  level t, the components of ``smoothed >= t`` whose maximum is t + h (each such "dome" one seed;
  exact on the image quantized to ``HMAX_STEP`` sd, see ``hmax_levels``). ``seed_threshold``
  clips the image from below (only levels >= it count: a peak must rise ``h`` above the
  threshold, or above its saddle with a higher peak); ``None``: no clipping.
- ``distance``: the h-maxima (``h`` in voxels) of the Euclidean distance transform of the
  foreground ``smoothed > seed_threshold``: one seed per thick part of the foreground, so a
  component joined to its neighbour by a thin bridge still gets two.

Seed components smaller than ``min_seed`` voxels are dropped. The flood (``relief_of``) is a
true watershed of the relief by level (``flood="level"``). The old baseline (VI 2.708 on gala,
``--grid old``) handed the inverted image to ``scipy.ndimage.watershed_ift`` as is, which floods
by the *difference* between neighbours, a watershed of the gradient (``flood="gradient"``).

Parameters are chosen by grid search on the training volume only (best VI against its labels),
then applied once to the held-out test volume: the split rules of ``../shared/data/README.md``.
``--methods``, ``--sigmas``, ``--flood-sigmas`` and ``--flood`` restrict the grid (a quick run).
Scores use ``ffn_jax.evaluation`` with the defaults of ``python -m ffn_jax.evaluate`` (truth 0
ignored, prediction 0 one segment). Prints the best training setting of each method, a table and
one JSON line.
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
METHODS = ("threshold", "hmax", "distance")
FLOODS = ("level", "gradient")
SAME = "same"  # flood_sigma: flood over the seed image (sigma) itself
# The grid: seed smoothing and flood smoothing for every method, then each method's own values.
# Chosen on gala_train (docs/quality.md); the old baseline's grid (105 settings, VI 2.708 on
# gala) is OLD_GRID.
GRID = {
    "sigma": (0.5, 0.75, 1.0, 1.5, 2.0),
    "flood_sigma": (0.0, 0.5, 1.0),
    "flood": ("level",),
    "methods": {
        "threshold": {"seed_threshold": (-0.25, 0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0),
                      "min_seed": (0, 50, 200, 800)},
        "hmax": {"h": (0.5, 1.0, 1.5, 1.75, 2.0, 2.5),
                 "seed_threshold": (None, -1.0, -0.5, 0.0, 0.5),
                 "min_seed": (0,)},
        "distance": {"seed_threshold": (-0.5, -0.25, 0.0, 0.25, 0.5),
                     "h": (2.0, 4.0, 6.0),
                     "min_seed": (0,)},
    },
}
OLD_GRID = {"sigma": (0.5, 1.0, 1.5, 2.0, 3.0),
            "seed_threshold": (-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25),
            "min_seed": (0, 50, 200)}
PARAM_KEYS = ("method", "sigma", "flood_sigma", "flood", "seed_threshold", "h", "min_seed")
HMAX_STEP = 0.05  # sd: quantization of the smoothed image for its h-maxima
DISTANCE_STEP = 0.25  # voxels: quantization of the distance map for its h-maxima
_NONE = np.iinfo(np.int32).min
_LEVELS = 16383  # relief levels of the "level" flood; its frame is 2 * _LEVELS + 1 = _MID
_MID = 32767
_FRAME = ((0, 0), (1, 1), (1, 1))


def read_box(folder: str, name: str, start, size) -> np.ndarray:
  vol = volumes.open_volume(os.path.join(DATA, folder, name))
  size = [s if s > 0 else d - a for s, a, d in zip(size, start, vol.shape)]
  return vol.read(start, size)


def smoothed(image: np.ndarray, sigma: float) -> np.ndarray:
  """The image smoothed and normalized to mean 0, sd 1 (over the volume)."""
  s = ndimage.gaussian_filter(image.astype(np.float32), sigma) if sigma > 0 else \
      image.astype(np.float32)
  return (s - s.mean()) / max(float(s.std()), 1e-6)


# -- seeds ----------------------------------------------------------------------------------------
def label_seeds(mask: np.ndarray, min_seed: int = 0) -> np.ndarray:
  """6-connected components of ``mask`` of at least ``min_seed`` voxels, numbered 1..n (int32)."""
  seeds, n = ndimage.label(mask)
  if min_seed > 0 and n:
    sizes = np.bincount(seeds.ravel())
    small = sizes < min_seed
    small[0] = False
    seeds[small[seeds]] = 0
    seeds, n = ndimage.label(seeds > 0)
  return seeds.astype(np.int32)


def hmax_levels(values: np.ndarray, hs, step: float, lowest: float | None = None) -> dict:
  """The h-maxima of ``values`` for every h in ``hs``, with the level each marker sits on.

  ``values`` is quantized to q = floor(values / step) and h to round(h / step); then for every
  level t from ``lowest`` (None: the minimum) up, the 6-connected components of ``q >= t`` whose
  maximum is exactly t + h are h-maxima markers (disjoint over t for one h; these are the regional
  maxima of the reconstruction by dilation of q - h under q, MATLAB's ``imextendedmax``;
  ``skimage.morphology.h_maxima`` keeps only the top plateau of each). Returns {h: int32 array holding, for
  each marker voxel, the level t (in units of ``step``) of its component; elsewhere int32 min}.
  The markers of the image clipped from below at a level L are those with level >= L
  (``hmax_seeds``), so one sweep serves every clipping threshold.
  """
  q = np.floor(values / step).astype(np.int32)
  hq = {h: int(round(h / step)) for h in hs}
  out = {h: np.full(q.shape, _NONE, np.int32) for h in hs}
  if q.size == 0:
    return out
  start = int(q.min()) if lowest is None else max(int(q.min()), int(np.ceil(lowest / step - 1e-9)))
  top = int(q.max())
  if lowest is None:  # h above the whole range: below the minimum the volume is one component
    for h, k in hq.items():
      if top - k < start:
        out[h][:] = top - k
  for t in range(start, top - min(hq.values()) + 1):
    lab, n = ndimage.label(q >= t)
    if n == 0:
      break
    top_of = np.asarray(ndimage.maximum(q, lab, np.arange(1, n + 1)), np.int64)
    for h, k in hq.items():
      chosen = np.concatenate([[False], top_of == t + k])
      if chosen.any():
        out[h][chosen[lab]] = t
  return out


def hmax_seeds(levels: np.ndarray, step: float, seed_threshold, min_seed: int) -> np.ndarray:
  """Seeds from one array of ``hmax_levels``: markers on levels >= seed_threshold (None: all)."""
  if seed_threshold is None:
    mask = levels != _NONE
  else:
    mask = levels >= int(np.ceil(seed_threshold / step - 1e-9))
  return label_seeds(mask, min_seed)


def distance_map(smooth_ZYX: np.ndarray, seed_threshold: float) -> np.ndarray:
  """Euclidean distance (voxels) of each foreground voxel (smoothed > threshold) to background."""
  return ndimage.distance_transform_edt(smooth_ZYX > seed_threshold).astype(np.float32)


# -- flooding -------------------------------------------------------------------------------------
def relief_of(smooth_ZYX: np.ndarray, flood: str = "level") -> np.ndarray:
  """The uint16 array ``flood_with`` floods over (``watershed_ift`` takes uint8/uint16 only).

  ``scipy.ndimage.watershed_ift`` does not flood its input by level: the cost of stepping from
  voxel p to a neighbour q is |input[p] - input[q]|, and a voxel goes to the seed whose path has
  the smallest largest step. Given the inverted image it is a watershed of the image's gradient:
  a membrane costs its edges, not its darkness. It also finds neighbours by flat index, so the
  last voxel of a row neighbours the first of the next (the volume wraps around in y and x).
  ``"gradient"`` hands it the inverted image all the same (the old baseline, wrap included).

  ``"level"`` makes it a true flood of the relief r = inverted image (membranes high), with the
  borders closed: 6-neighbours differ in the parity of z + y + x, so with input R + r on even and
  R - r on odd voxels every step costs r[p] + r[q], and a voxel goes to the seed reachable over
  the lowest ridge (a ridge's height counted as the sum of two neighbouring voxels' relief rather
  than the higher one's). r takes 0..16383 and a one-voxel frame in y and x takes 32767, so every
  step into the frame costs more than any step inside: no path through it (or around the wrap)
  ever wins. The returned array carries that frame (``flood_with`` adds it to the seeds).
  """
  lo, hi = float(smooth_ZYX.min()), float(smooth_ZYX.max())
  if flood == "gradient":
    return np.round((hi - smooth_ZYX) / max(hi - lo, 1e-6) * 65535).astype(np.uint16)
  if flood != "level":
    raise ValueError(f"unknown flood {flood!r}; known: {FLOODS}")
  r = np.round((hi - smooth_ZYX) / max(hi - lo, 1e-6) * _LEVELS).astype(np.int32)
  r = np.pad(r, _FRAME, constant_values=2 * _LEVELS + 1)
  parity = sum(np.indices(r.shape, sparse=True)) % 2
  return np.where(parity == 0, _MID + r, _MID - r).astype(np.uint16)


def flood_with(relief: np.ndarray, seeds: np.ndarray) -> np.ndarray:
  """Every voxel labelled from the seeds over a ``relief_of`` array; uint32 IDs (0 = no seed)."""
  if not seeds.any():
    return np.zeros(seeds.shape, np.uint32)
  framed = relief.shape != seeds.shape
  markers = np.pad(seeds.astype(np.int32), _FRAME) if framed else seeds.astype(np.int32)
  out = ndimage.watershed_ift(relief, markers).astype(np.uint32)
  return out[:, 1:-1, 1:-1] if framed else out


def flood(smooth_ZYX: np.ndarray, seeds: np.ndarray, flood: str = "level") -> np.ndarray:
  """Watershed of the inverted normalized image from labelled seeds; uint32 IDs."""
  return flood_with(relief_of(smooth_ZYX, flood), seeds)


def watershed(smooth_ZYX: np.ndarray, seed_threshold: float, min_seed: int) -> np.ndarray:
  """The old baseline: threshold seeds, gradient flood over the same smoothed image."""
  return flood(smooth_ZYX, label_seeds(smooth_ZYX > seed_threshold, min_seed), "gradient")


def seeds_for(params: dict, smooth_ZYX: np.ndarray) -> np.ndarray:
  """The labelled seeds of one setting (``PARAM_KEYS``) on the image smoothed with its sigma."""
  method, t, h, min_seed = (params[k] for k in ("method", "seed_threshold", "h", "min_seed"))
  if method == "threshold":
    return label_seeds(smooth_ZYX > t, min_seed)
  if method == "hmax":
    levels = hmax_levels(smooth_ZYX, [h], HMAX_STEP, lowest=t)[h]
    return hmax_seeds(levels, HMAX_STEP, t, min_seed)
  if method == "distance":
    levels = hmax_levels(distance_map(smooth_ZYX, t), [h], DISTANCE_STEP, lowest=1.0)[h]
    return hmax_seeds(levels, DISTANCE_STEP, None, min_seed)
  raise ValueError(f"unknown seed method {method!r}")


def segment(image: np.ndarray, params: dict) -> np.ndarray:
  """One setting applied to a raw image: uint32 segment IDs."""
  smooth = smoothed(image, params["sigma"])
  relief = smooth if params["flood_sigma"] == params["sigma"] else \
      smoothed(image, params["flood_sigma"])
  return flood(relief, seeds_for(params, smooth), params["flood"])


# -- the grid -------------------------------------------------------------------------------------
def full_grid(grid: dict) -> dict:
  """``grid`` in the nested form; the old flat form (sigma, seed_threshold, min_seed, as in
  ``OLD_GRID``) is the old baseline: threshold seeds, gradient flood over the seed image."""
  if "methods" in grid:
    return {"flood": ("level",), **grid}
  return {"sigma": tuple(grid["sigma"]), "flood_sigma": (SAME,), "flood": ("gradient",),
          "methods": {"threshold": {"seed_threshold": tuple(grid["seed_threshold"]),
                                    "min_seed": tuple(grid["min_seed"])}}}


def restrict_grid(grid: dict, methods=None, sigmas=None, flood_sigmas=None, floods=None) -> dict:
  """``grid`` with only the given methods / sigmas / flood sigmas / floods (None: as it is)."""
  grid = full_grid(grid)
  unknown = set(methods or ()) - set(grid["methods"])
  if unknown:
    raise ValueError(f"unknown seed method(s) {sorted(unknown)}; known: {sorted(grid['methods'])}")
  unknown = set(floods or ()) - set(FLOODS)
  if unknown:
    raise ValueError(f"unknown flood(s) {sorted(unknown)}; known: {list(FLOODS)}")
  return {"sigma": tuple(sigmas) if sigmas else grid["sigma"],
          "flood_sigma": tuple(flood_sigmas) if flood_sigmas else grid["flood_sigma"],
          "flood": tuple(floods) if floods else grid["flood"],
          "methods": {m: v for m, v in grid["methods"].items() if not methods or m in methods}}


def _seed_settings(method: str, values: dict, smooth: np.ndarray):
  """(params without sigma / flood_sigma, labelled seeds) for every setting of one method."""
  min_seeds = values.get("min_seed", (0,))
  if method == "threshold":
    for t, m in itertools.product(values["seed_threshold"], min_seeds):
      yield {"seed_threshold": t, "h": None, "min_seed": m}, label_seeds(smooth > t, m)
  elif method == "hmax":
    floors = values["seed_threshold"]
    lowest = None if any(f is None for f in floors) else min(floors)
    levels = hmax_levels(smooth, values["h"], HMAX_STEP, lowest=lowest)
    for h, t, m in itertools.product(values["h"], floors, min_seeds):
      yield {"seed_threshold": t, "h": h, "min_seed": m}, hmax_seeds(levels[h], HMAX_STEP, t, m)
  elif method == "distance":
    for t in values["seed_threshold"]:
      levels = hmax_levels(distance_map(smooth, t), values["h"], DISTANCE_STEP, lowest=1.0)
      for h, m in itertools.product(values["h"], min_seeds):
        yield ({"seed_threshold": t, "h": h, "min_seed": m},
               hmax_seeds(levels[h], DISTANCE_STEP, None, m))
  else:
    raise ValueError(f"unknown seed method {method!r}")


def score(seg: np.ndarray, truth: np.ndarray) -> dict:
  m = evaluation.evaluate_segmentation(seg, truth)
  return {k: m[k] for k in ("vi", "vi_split", "vi_merge", "are", "fraction_labelled",
                            "segments_pred")}


def params_of(row: dict) -> dict:
  return {k: row[k] for k in PARAM_KEYS}


def describe(params: dict) -> str:
  p = params
  seeds = {"threshold": f"threshold {p['seed_threshold']}",
           "hmax": f"h {p['h']}, clipped at {p['seed_threshold']}",
           "distance": f"foreground > {p['seed_threshold']}, distance h {p['h']}"}[p["method"]]
  return (f"{p['method']}: sigma {p['sigma']}, {seeds}, min seed {p['min_seed']}, "
          f"{p['flood']} flood, flood sigma {p['flood_sigma']}")


def grid_search(image, truth, grid=GRID, log=print) -> tuple[dict, list[dict]]:
  """Every parameter combination scored on (image, truth); returns (best params, all rows).

  Ties go to the first setting in grid order (methods in ``grid`` order)."""
  grid = full_grid(grid)
  rows = []
  smooths = {}

  def smooth_of(sigma):  # the normalized smoothed images, each computed once
    if sigma not in smooths:
      smooths[sigma] = smoothed(image, sigma)
    return smooths[sigma]

  reliefs = {}
  t0 = time.perf_counter()
  for sigma in grid["sigma"]:
    if rows:
      log(f"  ... sigma {sigma}: {len(rows)} settings scored in {time.perf_counter() - t0:.0f} s")
    smooth = smooth_of(sigma)
    flood_sigmas = dict.fromkeys(sigma if fs == SAME else float(fs) for fs in grid["flood_sigma"])
    for fs, fl in itertools.product(flood_sigmas, grid["flood"]):
      if (fs, fl) not in reliefs:
        reliefs[fs, fl] = relief_of(smooth_of(fs), fl)
    for method, values in grid["methods"].items():
      for params, seeds in _seed_settings(method, values, smooth):
        for fs, fl in itertools.product(flood_sigmas, grid["flood"]):
          row = {"method": method, "sigma": sigma, "flood_sigma": fs, "flood": fl, **params}
          seg = flood_with(reliefs[fs, fl], seeds)
          rows.append({**row, **score(seg, truth), "seeds": int(seeds.max())})
  best = min(rows, key=lambda r: r["vi"])
  for method in grid["methods"]:
    mine = [r for r in rows if r["method"] == method]
    b = min(mine, key=lambda r: r["vi"])
    log(f"  {method:<9} {len(mine):4d} settings; best training VI {b['vi']:.3f} "
        f"({b['vi_split']:.3f} / {b['vi_merge']:.3f}) at {describe(b)}")
  log(f"grid: {len(rows)} settings; best on training data: VI {best['vi']:.3f} at "
      f"{describe(best)}")
  return params_of(best), rows


def run_baseline(train_image, train_truth, test_image, test_truth, grid=GRID, log=print) -> dict:
  """Chooses the parameters on the training pair, scores them on the test pair."""
  params, rows = grid_search(train_image, train_truth, grid, log)
  best_train = min(rows, key=lambda r: r["vi"])
  seg = segment(test_image, params)
  test = score(seg, test_truth)
  by_method = {}
  for r in rows:
    if r["method"] not in by_method or r["vi"] < by_method[r["method"]]["vi"]:
      by_method[r["method"]] = {**params_of(r), "vi": r["vi"]}
  return {"params": params, "train": {k: best_train[k] for k in test},
          "test": test, "grid_size": len(rows), "best_train_by_method": by_method,
          "segmentation": seg}


def _zyx(text: str):
  values = tuple(int(v) for v in text.split(","))
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f"expected Z,Y,X, got {text!r}")
  return values


def _methods(text: str):
  values = tuple(v.strip() for v in text.split(",") if v.strip())
  bad = [v for v in values if v not in METHODS]
  if bad or not values:
    raise argparse.ArgumentTypeError(f"expected some of {','.join(METHODS)}, got {text!r}")
  return values


def _floats(text: str):
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
  if any(v < 0 for v in values):
    raise argparse.ArgumentTypeError(f"sigmas must be >= 0, got {text!r}")
  return values


def _flood_sigmas(text: str):
  values = tuple(SAME if v.strip() == SAME else v for v in text.split(","))
  try:
    values = tuple(v if v == SAME else float(v) for v in values)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected '{SAME}' or numbers, got {text!r}")
  if any(v != SAME and v < 0 for v in values):
    raise argparse.ArgumentTypeError(f"flood sigmas must be >= 0, got {text!r}")
  return values


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", choices=sorted(DATASETS), default="gala")
  p.add_argument("--test-start-zyx", type=_zyx, default=None, help="test box start (z,y,x)")
  p.add_argument("--test-size-zyx", type=_zyx, default=None, help="test box size (z,y,x)")
  p.add_argument("--train-start-zyx", type=_zyx, default=None, help="training box start")
  p.add_argument("--train-size-zyx", type=_zyx, default=None, help="training box size")
  p.add_argument("--methods", type=_methods, default=None,
                 help=f"seed methods to search, comma-separated (default: {','.join(METHODS)})")
  p.add_argument("--sigmas", type=_floats, default=None,
                 help="seed smoothing sigmas to search (default: %s)" %
                 ",".join(str(s) for s in GRID["sigma"]))
  p.add_argument("--flood-sigmas", type=_flood_sigmas, default=None,
                 help=f"flood smoothing sigmas to search, '{SAME}' = the seed sigma (default: "
                 + ",".join(str(s) for s in GRID["flood_sigma"]) + ")")
  p.add_argument("--grid", choices=("wide", "old"), default="wide",
                 help="wide: GRID, three seed methods (default); old: OLD_GRID, the old "
                 "baseline's 105 threshold settings with the gradient flood")
  p.add_argument("--flood", choices=FLOODS, default=None,
                 help="level: flood the inverted image by level (default); gradient: "
                 "watershed_ift on it as is, a watershed of its gradient (the old baseline)")
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
  grid = restrict_grid(GRID if args.grid == "wide" else OLD_GRID, args.methods, args.sigmas, args.flood_sigmas,
                       [args.flood] if args.flood else None)
  train = [read_box(tr_folder, n, tr_start, tr_size) for n in ("image.zarr", "labels.zarr")]
  test = [read_box(te_folder, n, te_start, te_size) for n in ("image.zarr", "labels.zarr")]
  result = run_baseline(train[0], train[1], test[0], test[1], grid=grid)
  seg = result.pop("segmentation")
  if args.out:
    volumes.write_zarr(args.out, seg, attrs={"offset_zyx": list(te_start),
                                             "baseline": "seeded watershed", **result["params"]})
  print(f"chosen: {describe(result['params'])}")
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
