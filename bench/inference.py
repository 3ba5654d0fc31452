"""Inference benchmark on a named crop of FIB-25 training_sample2 with Google's settings.

  python bench/inference.py --crop c64 --checkpoint /tmp/fib25_ckpt [--batch-sizes 1 4]
  python bench/inference.py --crop c100 --compute-dtypes float32 bfloat16   # precision
  python bench/inference.py --crop c100 --tile-size 70 --tile-overlap 34     # tiled + stitched
  python bench/inference.py --crop c150 --tile-size 100 --tile-overlap 48 --tile-mode independent

Runs ``ffn_jax.inference.runner.run`` (configs/fib25_infer.py) once per batch size, then prints a
table of VI / adapted Rand error against the ground truth of the crop (all voxels; unlabelled
counts as one segment), FOV calls and wall time, next to Google's TensorFlow numbers for the same
crop and to Google's published segmentation restricted to the crop, and a final JSON line.
``--compute-dtypes`` runs each batch size in each precision (model.compute_dtype); with
``--tile-size`` the crop is also segmented in overlapping tiles and stitched
(``ffn_jax/inference/tiled.py``, first batch size and dtype) and compared with the single pass:
VI between the two, and the single-pass segments that the stitched result splits.
Crops are evaluation crops: never tune thresholds on them (../shared/data/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from configs import fib25_infer  # noqa: E402
from ffn_jax import evaluation  # noqa: E402
from ffn_jax.data import volumes  # noqa: E402
from ffn_jax.inference import runner  # noqa: E402

CROPS = _common.FIB25_CROPS
# Google's TF FFN on this machine with the same checkpoint and settings (crop as the volume).
TF_REFERENCE = {"c64": {"vi": 1.763, "fov_calls": 67, "wall_s": 28.0},
                "c100": {"vi": 1.886, "are": 0.198, "fov_calls": 726, "wall_s": 200.0},
                "c150": {"vi": 1.657, "are": 0.124, "fov_calls": 3872, "wall_s": 1241.0}}
DATA = _common.shared_data_dir()


def _crop(volume_path: str, start: int, size: int) -> np.ndarray:
  return volumes.open_volume(volume_path).read((start,) * 3, (size,) * 3)


def run_one(crop: str, checkpoint: str, batch_size: int, workdir: str, conv_impl: str,
            compute_dtype: str = "float32", tile: int = 0, overlap: int = 0,
            stitch: tuple = (), stitch_output: str = "", tile_mode: str = "continue") -> dict:
  """One run on the crop; tiled with ``tile`` > 0. A rerun of a finished tiled run with other
  ``stitch`` thresholds and a new ``stitch_output`` restitches its tiles."""
  start, size = CROPS[crop]
  c = fib25_infer.get_config()
  c.checkpoint = checkpoint
  c.bbox_start_zyx = (start,) * 3
  c.bbox_size_zyx = (size,) * 3
  c.batch_size = batch_size
  c.conv_impl = conv_impl
  c.compute_dtype = compute_dtype
  c.progress_interval_s = 30.0
  if tile:
    from ffn_jax.inference import tiled
    c.tile_size_zyx = (tile,) * 3
    c.tile_overlap_zyx = (overlap,) * 3
    c.tile_mode = tile_mode
    if stitch:
      c.stitch.min_overlap_voxels, c.stitch.min_fraction = stitch
    c.stitch.output = stitch_output
    t0 = time.perf_counter()
    counters = tiled.run(c, workdir)
    counters["wall_s"] = time.perf_counter() - t0
  else:
    counters = runner.run(c, workdir)
  seg = volumes.open_volume(os.path.join(workdir, stitch_output or runner.SEGMENTATION)).read()
  return {"counters": counters, "seg": seg}


def _row(name, m=None, counters=None, ref=None, same=""):
  m = m or {}
  counters = counters or {}
  ref = ref or {}
  get = lambda k: m.get(k, ref.get(k))  # noqa: E731
  fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
  fov = counters.get("fov_calls", ref.get("fov_calls"))
  wall = counters.get("wall_s", ref.get("wall_s"))
  return (f"{name:<22} {fmt(get('vi'), '.3f'):>6} {fmt(get('vi_split'), '.3f'):>6} "
          f"{fmt(get('vi_merge'), '.3f'):>6} {fmt(get('are'), '.3f'):>6} "
          f"{fmt(m.get('segments_pred'), 'd'):>5} {fmt(fov, 'd'):>6} "
          f"{fmt(counters.get('batches'), 'd'):>6} {fmt(wall, '.1f'):>8} {same:>5}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--crop", choices=sorted(CROPS), default="c64")
  ap.add_argument("--checkpoint", default="/tmp/fib25_ckpt",
                  help="orbax checkpoint of Google's model (python -m ffn_jax.import_tf_checkpoint"
                       " ../shared/data/google_ffn_fib25/model.ckpt-27465036 --out DIR)")
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
  ap.add_argument("--conv-impl", default="auto")
  ap.add_argument("--compute-dtypes", nargs="+", default=["float32"],
                  choices=["float32", "bfloat16", "auto"])
  ap.add_argument("--tile-size", type=int, default=0, help="also run tiled (cubes of this size)")
  ap.add_argument("--tile-overlap", type=int, default=48)
  ap.add_argument("--tile-mode", default="continue", choices=["continue", "independent"])
  ap.add_argument("--stitch", default="",
                  help="MIN_VOXELS,MIN_FRACTION pairs to restitch with, e.g. '100,0.6 1000,0.8'")
  ap.add_argument("--workdir", default="", help="default: a fresh temporary directory")
  args = ap.parse_args(argv)

  start, size = CROPS[args.crop]
  truth = _crop(os.path.join(DATA, "fib25_training_sample2", "labels.zarr"), start, size)
  official_path = os.path.join(DATA, "google_ffn_fib25",
                               "official_segmentation_training_sample2.zarr")
  official = _crop(official_path, start, size) if os.path.exists(official_path) else None
  base = args.workdir or tempfile.mkdtemp(prefix=f"bench_infer_{args.crop}_")

  results = {}
  for dtype in args.compute_dtypes:
    for b in args.batch_sizes:
      key = f"batch{b}" + ("" if dtype == "float32" else f"_{dtype}")
      r = run_one(args.crop, args.checkpoint, b, os.path.join(base, key), args.conv_impl, dtype)
      r["metrics"] = evaluation.evaluate_segmentation(r["seg"], truth)
      if official is not None:
        r["vs_official"] = evaluation.evaluate_segmentation(r["seg"], official)
      results[key] = r
  first_key = next(iter(results))
  tiled_results = {}
  for spec in ([None] + [tuple(float(v) for v in s.split(",")) for s in args.stitch.split()]
               if args.tile_size else []):
    name = "tiled" if spec is None else f"tiled_{int(spec[0])}_{spec[1]:g}"
    stitch = () if spec is None else (int(spec[0]), spec[1])
    r = run_one(args.crop, args.checkpoint, args.batch_sizes[0], os.path.join(base, "tiled"),
                args.conv_impl, args.compute_dtypes[0], args.tile_size, args.tile_overlap,
                stitch, "" if spec is None else f"{name}.zarr", args.tile_mode)
    r["metrics"] = evaluation.evaluate_segmentation(r["seg"], truth)
    single = results[first_key]["seg"]
    r["vs_single"] = evaluation.evaluate_segmentation(r["seg"], single)
    r["split_objects"] = evaluation.split_objects(single, r["seg"])
    tiled_results[name] = r

  header = (f"{'run (' + args.crop + ')':<22} {'VI':>6} {'split':>6} {'merge':>6} {'ARE':>6} "
            f"{'segs':>5} {'FOVs':>6} {'calls':>6} {'wall_s':>8} {'=b1':>5}")
  print(header)
  print("-" * len(header))
  if args.crop in TF_REFERENCE:
    print(_row("google TF (reference)", ref=TF_REFERENCE[args.crop]))
  if official is not None:
    print(_row("google published, crop", evaluation.evaluate_segmentation(official, truth)))
  first = results[first_key]["seg"]
  for key, r in results.items():
    same = "yes" if np.array_equal(r["seg"], first) else "NO"
    print(_row(f"ffn_jax {key}", r["metrics"], r["counters"], same=same))
  for name, r in tiled_results.items():
    print(_row(f"{name} {args.tile_size}/{args.tile_overlap}", r["metrics"],
               {"wall_s": r["counters"].get("wall_s")}))
    print(f"  vs the single pass ({first_key}): VI {r['vs_single']['vi']:.4f} (split "
          f"{r['vs_single']['vi_split']:.4f}, merge {r['vs_single']['vi_merge']:.4f}); "
          f"{r['split_objects']} single-pass segments (>= 1000 voxels) split; "
          f"{r['counters'].get('merges')} merges")

  summary = {"crop": args.crop, "workdir": base, "reference_tf": TF_REFERENCE.get(args.crop),
             "cpu": _common.cpu_model(), "load_avg_end": os.getloadavg()}
  for name, r in tiled_results.items():
    summary[name] = {"vi": r["metrics"]["vi"], "are": r["metrics"]["are"],
                     "vi_vs_single": r["vs_single"]["vi"],
                     "vi_split_vs_single": r["vs_single"]["vi_split"],
                     "vi_merge_vs_single": r["vs_single"]["vi_merge"],
                     "split_objects": r["split_objects"], "merges": r["counters"].get("merges"),
                     "segments": r["counters"].get("segments"),
                     "wall_s": r["counters"].get("wall_s"),
                     "tile_size": args.tile_size, "tile_overlap": args.tile_overlap,
                     "tile_mode": args.tile_mode,
                     "stitch": r["counters"].get("stitch")}
  for key, r in results.items():
    c, m = r["counters"], r["metrics"]
    summary[key] = {
        "vi": m["vi"], "vi_split": m["vi_split"], "vi_merge": m["vi_merge"], "are": m["are"],
        "segments": c["segments"], "fov_calls": c["fov_calls"], "batches": c.get("batches"),
        "fov_wasted": c.get("fov_wasted", 0), "wall_s": c["wall_s"],
        "predict_s": c.get("time_predict_s"), "compile_s": c.get("time_compile_s"),
        "fraction_labelled": m["fraction_labelled"],
        "same_as_first": bool(np.array_equal(r["seg"], first)),
        "vi_vs_official": r.get("vs_official", {}).get("vi")}
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
