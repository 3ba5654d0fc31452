"""How well the inference progress line's ETA holds: every line against the time really left.

  python bench/eta_accuracy.py --trace runs/eta_c100.jsonl -- \\
      --config configs/fib25_infer.py --workdir runs/eta_c100 --config.checkpoint=runs/fib25_google \\
      --config.batch_size=8 --config.bbox_start_zyx='(75,75,75)' --config.bbox_size_zyx='(100,100,100)' \\
      --config.border_padding=context
  python bench/eta_accuracy.py --trace runs/eta_c100.jsonl      # score an existing trace again

Runs ``infer.py`` with the arguments after ``--`` and, every ``--every-s`` seconds of the flood,
records what ``progress.FloodProgress`` reads (FOV calls, open candidates, covered voxels,
canvas size) to ``--trace`` (JSON lines). Then it replays the trace through each estimator
(``candidates``: open candidates x FOVs per closed candidate; ``coverage``: voxels left to
cover x FOVs per covered voxel; ``product``: the larger of the two, what the progress line
shows), turns FOVs into seconds at the rate measured since the first record, and compares each
with the time that really remained, for the lines after the first ``--from`` share of the FOVs.
Prints one JSON object: per estimator the share of lines within 2x, the ratio range, and the
misses (share of FOVs done, ETA shown, seconds left).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def record(trace_path: str, infer_args: list[str], every_s: float) -> None:
  """Runs infer.py in this process with ``Canvas.segment_all`` wrapped to write the trace."""
  import runpy
  from ffn_jax.inference import canvas as canvas_lib
  original = canvas_lib.Canvas.segment_all
  out = open(trace_path, "w")

  def segment_all(self, on_step=None):
    t0 = time.perf_counter()
    last = [-every_s]
    covered0 = self.covered_voxels()  # a prior's or a resumed run's voxels (FloodProgress._cov0)

    def step(canvas):
      now = time.perf_counter() - t0
      if now - last[0] >= every_s:
        last[0] = now
        out.write(json.dumps({
            "t": now, "fov": canvas.counters.get("fov_calls", 0),
            "open": canvas.open_candidates(), "covered": canvas.covered_voxels(),
            "covered0": covered0, "size": int(canvas.segmentation.size)}) + "\n")
        out.flush()
      if on_step is not None:
        on_step(canvas)

    result = original(self, step)
    out.write(json.dumps({"t": time.perf_counter() - t0, "end": True,
                          "fov": self.counters.get("fov_calls", 0)}) + "\n")
    out.flush()
    return result

  canvas_lib.Canvas.segment_all = segment_all
  sys.argv = [os.path.join(REPO, "infer.py"), *infer_args]
  try:
    runpy.run_path(sys.argv[0], run_name="__main__")
  except SystemExit as e:  # infer.py ends with sys.exit(main(...))
    if e.code not in (0, None):
      raise
  finally:
    out.close()


def score(trace_path: str, start_fraction: float) -> dict:
  from ffn_jax.inference.progress import EXPECTED_COVERAGE
  rows = [json.loads(line) for line in open(trace_path)]
  ends = [r for r in rows if r.get("end")]
  if not ends:
    raise SystemExit(f"error: {trace_path} has no end record (the run did not finish)")
  end = ends[0]
  rows = [r for r in rows if not r.get("end")]
  first, total = rows[0], end["fov"]
  open0 = first["open"]
  estimators = {
      "candidates": lambda r: r["open"] * r["fov"] / max(open0 - r["open"], 1),
      "coverage": lambda r: (max(EXPECTED_COVERAGE * r["size"] - r["covered"], 0)
                             * r["fov"] / max(r["covered"] - r.get("covered0", 0), 1)),
  }
  estimators["product"] = lambda r: max(estimators["candidates"](r), estimators["coverage"](r))
  out = {"trace": trace_path, "fov_calls": total, "flood_s": round(end["t"], 1),
         "from_fraction": start_fraction, "expected_coverage": EXPECTED_COVERAGE,
         "final_coverage": round(rows[-1]["covered"] / rows[-1]["size"], 3)}
  for name, fovs_left in estimators.items():
    ratios, misses = [], []
    for r in rows[1:]:
      if r["fov"] < start_fraction * total or r["fov"] <= first["fov"] or r["open"] == 0:
        continue
      eta = fovs_left(r) * (r["t"] - first["t"]) / (r["fov"] - first["fov"])
      left = end["t"] - r["t"]
      ratios.append(eta / left)
      if not 0.5 <= eta / left <= 2.0:
        misses.append([round(100 * r["fov"] / total), round(eta), round(left)])
    out[name] = {"lines": len(ratios),
                 "within_2x": round(1 - len(misses) / max(len(ratios), 1), 3),
                 "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
                 "misses_pct_eta_left": misses}
  return out


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  infer_args = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--trace", required=True, help="JSON-lines trace to write (with -- ARGS) or read")
  p.add_argument("--every-s", type=float, default=2.0)
  p.add_argument("--from", dest="start", type=float, default=0.1,
                 help="score the lines after this share of the FOVs")
  args = p.parse_args(own)
  if infer_args:
    if os.path.exists(args.trace):
      raise SystemExit(f"error: {args.trace} exists; remove it or score it without -- ARGS")
    record(args.trace, infer_args, args.every_s)
  elif not os.path.exists(args.trace):
    raise SystemExit(f"error: no trace {args.trace} (record one: -- INFER_ARGS)")
  print(json.dumps(score(args.trace, args.start)))


if __name__ == "__main__":
  main()
