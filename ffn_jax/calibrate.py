"""Calibrates a trained model's flood settings on a labelled validation box and stores them with
its checkpoint (``ffn_jax.calibration``); ``infer.py`` then uses them by default.

Usage (the box is validation data: labelled, held out from training, never the test volume):
  python -m ffn_jax.calibrate --config configs/gala_infer.py --workdir runs/cal \\
      --labels ../shared/data/gala_train/labels.zarr \\
      --config.image=../shared/data/gala_train/image.zarr --config.checkpoint=runs/gala \\
      --config.bbox_start_zyx='(0,0,160)' --config.bbox_size_zyx='(50,100,40)' \\
      [--move-thresholds 0.8,0.9] [--segment-thresholds 0.5,0.6,0.7,0.8] \\
      [--min-size-factors 0.5,2,4] [--no-store]

Writes ``WORKDIR/calibration.json`` (every setting tried, with its VI), adds the winner to the
checkpoint's ``calibration.json`` (unless ``--no-store``) and prints one JSON object. Bad input:
one ``error:`` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ffn_jax import calibration, cli
from ffn_jax.errors import UserError


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(f"{message} (see --help)")


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def run(argv: list[str]) -> dict:
  p = _Parser(prog="python -m ffn_jax.calibrate", description=__doc__.split("\n")[0],
              add_help=False)
  p.add_argument("--labels", required=True, help="volume spec of the box's truth")
  p.add_argument("--move-thresholds", type=_floats,
                 default=calibration.DEFAULT_GRID["move_threshold"])
  p.add_argument("--segment-thresholds", type=_floats,
                 default=calibration.DEFAULT_GRID["segment_threshold"])
  p.add_argument("--min-size-factors", type=_floats,
                 default=calibration.DEFAULT_GRID["min_segment_size"])
  p.add_argument("--no-store", action="store_true")
  args, rest = p.parse_known_args(argv[1:])
  config, workdir = cli.parse([argv[0], *rest],
                              os.path.join(cli.REPO_ROOT, "configs", "fib25_infer.py"),
                              "ffn_jax.calibrate")
  from ffn_jax.data import volumes
  from ffn_jax.inference import job as job_lib
  config.unlock()
  config.calibration = "off"  # the search starts from the config's own settings
  config.lock()
  job = job_lib.InferenceJob.open(config)
  bbox = job.bbox()
  labels = volumes.open_volume(args.labels)
  if tuple(labels.shape) != tuple(job.source.shape):
    raise UserError(f"labels {args.labels} have shape {tuple(labels.shape)}, the image "
                    f"{tuple(job.source.shape)} (zyx)")
  truth = labels.read(bbox[0], bbox[1])
  seeds = job.seeds(bbox)
  log = job_lib._log

  def flood(values):
    job.set_flood(**values)
    return job.segment(bbox, seeds_zyx=seeds).segmentation

  base = {k: config.inference[k] for k in calibration.KEYS}
  grid = {"move_threshold": args.move_thresholds, "segment_threshold": args.segment_thresholds,
          "min_segment_size": args.min_size_factors}
  best, rows = calibration.search(flood, truth, base, grid, log)
  os.makedirs(workdir, exist_ok=True)
  record = {"box_start_zyx": list(bbox[0]), "box_size_zyx": list(bbox[1]),
            "image": job.image_desc, "labels": str(args.labels), "base": base,
            "vi": min(r["vi"] for r in rows), "rows": rows}
  with open(os.path.join(workdir, calibration.FILE), "w") as f:
    json.dump({"best": best, **record}, f, indent=1)
    f.write("\n")
  stored = None
  if not args.no_store:
    stored = calibration.store(config.checkpoint, str(config.get("checkpoint_kind", "latest")),
                               job.checkpoint_step, best, {k: v for k, v in record.items() if k != "rows"})
  return {"best": best, "vi": record["vi"], "base_vi": next(
      (r["vi"] for r in rows if all(r[k] == base[k] for k in calibration.KEYS)), None),
          "tries": len(rows), "stored": stored}


def main(argv=None) -> int:
  with cli.clean_errors():
    print(json.dumps(run(list(sys.argv if argv is None else argv))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
