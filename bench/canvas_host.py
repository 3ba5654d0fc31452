"""Host time of the inference canvas loop alone, with the model replaced by a label oracle.

  python bench/canvas_host.py --crop c150 --batch-size 8 --repeats 3

On a GPU the FFN call is a few ms, so what the canvas does on the host between calls (FOV
crops, seed write-back, movement, commits, object-map resets) decides the inference time. This
runs ``Canvas.segment_all`` on a FIB-25 crop (seeds from the peaks policy on the real image,
Google's inference thresholds) with an oracle in place of the network: each FOV's logits say
"the label that most of the current object's voxels in the FOV carry", falling off from the
FOV centre so that face maxima are unique. The oracle's own time is excluded: the table gives host ms per FOV call (loop wall
minus oracle time, over FOV calls) and the commit share, median over ``--repeats``.

To compare two versions of the code side by side, run this script from each checkout in turn
(same machine, same run): ``PYTHONPATH=OTHER_CHECKOUT python bench/canvas_host.py ...``;
the first JSON line names the code it imported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if not any(os.path.exists(os.path.join(p or ".", "ffn_jax")) for p in sys.path[1:]):
  sys.path.insert(0, REPO)  # an explicit PYTHONPATH checkout wins
import ffn_jax  # noqa: E402  (before _common, which puts this checkout first on the path)

sys.path.insert(1, HERE)
import _common  # noqa: E402
from ffn_jax.data import volumes  # noqa: E402
from ffn_jax.inference import canvas as canvas_lib  # noqa: E402
from ffn_jax.inference import settings  # noqa: E402
from configs import fib25_infer  # noqa: E402  (_common put the repository on the path)

CROPS = _common.FIB25_CROPS
DATA = os.path.join(_common.shared_data_dir(), "fib25_training_sample2")
FOV = (33, 33, 33)
DELTAS = (8, 8, 8)


def oracle(labels: np.ndarray, timer: list):
  """predict(image_BZYX, seed_BZYX) from the labels under each FOV. The canvas is given an
  image of voxel indices, so an FOV's first voxel says where it is."""
  radius = np.sqrt(sum(g.astype(np.float32) ** 2 for g in np.meshgrid(
      *[np.arange(n) - n // 2 for n in FOV], indexing="ij")))
  falloff = (4.0 - 0.05 * radius).astype(np.float32)

  def predict(image_BZYX, seed_BZYX):
    t0 = time.perf_counter()
    out = np.empty_like(seed_BZYX)
    for b in range(image_BZYX.shape[0]):
      lo = np.unravel_index(int(image_BZYX[b, 0, 0, 0]), labels.shape)
      lab = labels[tuple(slice(a, a + n) for a, n in zip(lo, FOV))]
      ids, counts = np.unique(lab[seed_BZYX[b] > 0.0], return_counts=True)
      keep = ids > 0
      if not keep.any():
        out[b] = -4.0
        continue
      obj = ids[keep][np.argmax(counts[keep])]
      out[b] = np.where(lab == obj, falloff, -4.0)
    timer.append(time.perf_counter() - t0)
    return out

  return predict


def run_once(labels: np.ndarray, coords: np.ndarray, batch_size: int) -> dict:
  timer: list = []
  index = np.arange(labels.size, dtype=np.float32).reshape(labels.shape)  # exact below 2**24
  options = settings.flood_options(fib25_infer.get_config())
  canvas = canvas_lib.Canvas(index, oracle(labels, timer), batch_size, FOV, DELTAS, options)
  canvas.set_seeds(coords)
  t0 = time.perf_counter()
  canvas.segment_all()
  wall = time.perf_counter() - t0
  fovs = canvas.counters.get("fov_calls", 0)
  return {"fov_calls": fovs, "segments": canvas.counters.get("segments", 0),
          "loop_s": wall, "oracle_s": sum(timer),
          "commit_s": canvas.counters.get("time_commit_s", 0.0),
          "host_ms_per_fov": 1e3 * (wall - sum(timer)) / max(fovs, 1),
          "segmentation_sha": _sha(canvas.segmentation)}


def _sha(a: np.ndarray) -> str:
  import hashlib
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--crop", choices=sorted(CROPS), default="c100")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args(argv)
  if not os.path.isdir(DATA):
    print(f"canvas_host: data not found: {DATA}", file=sys.stderr)
    return 2
  start, size = CROPS[args.crop]
  read = lambda name: volumes.open_volume(os.path.join(DATA, name)).read(  # noqa: E731
      (start,) * 3, (size,) * 3)
  raw = read("image.zarr")
  labels = read("labels.zarr").astype(np.int64)
  coords = settings.seed_coords(fib25_infer.get_config(),
                               volumes.normalize(raw, 128.0, 33.0))
  print(json.dumps({"code": os.path.dirname(os.path.abspath(ffn_jax.__file__)),
                    **_common.machine(), "crop": args.crop, "seeds": len(coords)}))
  runs = [run_once(labels, coords, args.batch_size) for _ in range(args.repeats)]
  med = {k: statistics.median(r[k] for r in runs)
         for k in ("loop_s", "oracle_s", "commit_s", "host_ms_per_fov")}
  print(f"{args.crop} batch {args.batch_size}: {runs[0]['fov_calls']} FOV calls, "
        f"{runs[0]['segments']} segments; loop {med['loop_s']:.2f} s, oracle "
        f"{med['oracle_s']:.2f} s, commits {med['commit_s']:.2f} s; "
        f"host {med['host_ms_per_fov']:.3f} ms per FOV (median of {args.repeats})")
  print(json.dumps({"crop": args.crop, "batch_size": args.batch_size,
                    "fov_calls": runs[0]["fov_calls"], "segments": runs[0]["segments"],
                    "segmentation_sha": runs[0]["segmentation_sha"], **med,
                    "host_ms_per_fov_all": [round(r["host_ms_per_fov"], 4) for r in runs]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
