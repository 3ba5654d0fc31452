"""Trains the same config with a float32 and a bfloat16 conv route and compares the curves.

Both runs start from the same seed and see the same data stream for as long as their models agree
(the recurrent FOV moves follow the model's own output, so the streams drift apart once the
weights do). After training, both final models are scored with the float32 route on the same held-out FOVs
(loss, F1) and by segmenting the same held-out volume (VI, ``lr_batch_study.segment_heldout``),
so the comparison is of what was learned, not of bf16 inference.

    python bench/precision_study.py --config configs/synthetic.py --steps 1500
    python bench/precision_study.py --config configs/fib25.py --steps 200 --val-fraction 0.2

Prints the curves side by side (train loss and F1 per logged window), the held-out loss/F1 and
the steady-state throughput of each route; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import _common
import lr_batch_study as study  # its held-out FOV sampling and scoring


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--routes", default="",
                 help="two conv routes: the float32 reference, then the one compared with it "
                      "(default: the routes compute_dtype float32 and bfloat16 pick here, e.g. "
                      "onednn,onednn_bf16; onednn,xla_bf16 where oneDNN cannot build bf16)")
  p.add_argument("--eval-route", default="",
                 help="route used to score both final models (default: the float32 reference)")
  p.add_argument("--log-points", type=int, default=30, help="logged windows per run")
  p.add_argument("--val-fovs", type=int, default=128)
  p.add_argument("--val-seed", type=int, default=1, help="synthetic held-out volume seed")
  p.add_argument("--val-fraction", type=float, default=0.2,
                 help="real data: the part of the training box (along y) held out")
  p.add_argument("--out", default="runs/precision_study")
  p.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
  args = p.parse_args(argv)
  args.routes = [r for r in args.routes.split(",") if r]
  if not args.routes:
    from ffn_jax import conv
    args.routes = [conv.select("auto", dtype)[0] for dtype in ("float32", "bfloat16")]
  args.eval_route = args.eval_route or args.routes[0]
  if len(args.routes) != 2:
    p.error("--routes takes exactly two routes")
  if args.steps < 1:
    p.error("--steps must be >= 1")
  return args


def train(config, route: str, steps: int, log_points: int, workdir: str) -> list[dict]:
  from ffn_jax.training import loop
  config = config.copy_and_resolve_references()
  config.model.conv_impl = route
  config.max_steps = steps
  config.log_every = max(1, steps // max(log_points, 1))
  config.checkpoint_every = 10**9  # the final step is saved regardless
  config.sync_check_every = 0
  workdir = _common.fresh_workdir(workdir)
  with open(os.path.join(workdir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
    loop.train_and_evaluate(config, workdir)
  return _common.read_metrics(workdir)


def main(argv=None) -> int:
  args = parse_args(argv)
  config = _common.load_config(args.config, args.overrides)
  val_box = None if study._is_synthetic(config) else study.split_training_box(  # pylint: disable=protected-access
      config, args.val_fraction)
  val = study.heldout_fovs(config, args.val_fovs, args.val_seed, val_box)
  eval_config = config.copy_and_resolve_references()
  eval_config.model.conv_impl = args.eval_route
  runs = {}
  for route in args.routes:
    t0 = time.perf_counter()
    workdir = os.path.join(args.out, route)
    records = train(config, route, args.steps, args.log_points, workdir)
    windows = _common.step_records(records)
    tail = windows[len(windows) * 3 // 4:]  # last quarter of the logged windows
    run = {
        "wall_s": time.perf_counter() - t0,
        "curve": [{"step": r["step"], "loss": r["loss"], "f1": r["f1"]} for r in windows],
        "train_loss_last_quarter": statistics.mean(r["loss"] for r in tail),
        "train_f1_last_quarter": statistics.mean(r["f1"] for r in tail),
        "fovs_per_s": _common.steady_state(records, min(2 * windows[0]["step"],
                                                        windows[-1]["window_start"]))["fovs_per_s"],
    }
    params = study.final_params(workdir)
    run.update(study.evaluate(params, eval_config, val))
    run.update(study.segment_heldout(params, eval_config, args.val_seed, val_box))
    runs[route] = run

  ref, other = args.routes
  print(f"\n# {args.config}: {args.steps} steps, global batch {windows[0]['global_batch']}; "
        f"held-out: {args.val_fovs} FOVs scored with the {args.eval_route} route")
  print(f"{'step':>6} {'loss ' + ref:>20} {'loss ' + other:>20} {'f1 ' + ref:>16} "
        f"{'f1 ' + other:>16}")
  for a, b in zip(runs[ref]["curve"], runs[other]["curve"]):
    print(f"{a['step']:>6} {a['loss']:>20.4f} {b['loss']:>20.4f} {a['f1']:>16.3f} {b['f1']:>16.3f}")
  for route, r in runs.items():
    print(f"# {route}: train loss (last quarter) {r['train_loss_last_quarter']:.4f}, "
          f"F1 {r['train_f1_last_quarter']:.3f}; held-out loss {r['val_loss']:.4f}, "
          f"F1 {r['val_f1']:.3f}, VI {r['val_vi']:.3f} (split {r['val_vi_split']:.3f}, merge "
          f"{r['val_vi_merge']:.3f}); {r['fovs_per_s']:.2f} FOV/s")
  summary = {
      "config": args.config, "steps": args.steps, "routes": args.routes,
      "eval_route": args.eval_route, "val_fovs": args.val_fovs,
      "speedup": runs[other]["fovs_per_s"] / runs[ref]["fovs_per_s"],
      "val_loss_ratio": runs[other]["val_loss"] / runs[ref]["val_loss"],
      "val_f1_diff": runs[other]["val_f1"] - runs[ref]["val_f1"],
      "val_vi_diff": runs[other]["val_vi"] - runs[ref]["val_vi"],
      "machine": _common.machine(), "load_avg_end": _common.load_average(),
      "runs": runs,
  }
  _common.emit_json(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
