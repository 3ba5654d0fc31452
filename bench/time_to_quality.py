"""Time to quality: how many steps, examples and hours each training run needed to reach a
validation VI, and what that means on 1 to 1024 nodes (the paper's question, in held-out terms).

    python bench/time_to_quality.py --target-vi 1.45 runs/st_gala_b8 runs/st_gala_b32_sqrt \\
        [--test b8=runs/st_gala_b8_test.json ...] [--nodes 1,16,128,1024] [--out runs/ttq]

Each WORKDIR is a finished (or running) train.py run whose segmentation eval scored a
*validation* box (``eval.*``: carved from the training data) at fixed step counts. Per run:
its global batch, optimizer, LR rule, peak LR, warmup, moving average; the first eval at or
below ``--target-vi`` (its step, examples, and the training seconds until then: the logged
windows' steps x batch / FOV/s, evaluations excluded; ``wall_s`` with them where the run
recorded it); the last and best validation VI; and a test VI where ``--test NAME=JSON`` gives
the ``python -m ffn_jax.evaluate`` output of its test segmentation.

Projection to N nodes, as in ``bench/scaling_model.py``: a synchronous step of global batch B on
N nodes is ``(B / N) / F + allreduce(N)``, F the single-node training FOV/s this run measured
(per-example time taken as independent of the batch; ``--fovs-per-s`` sets one F for every run,
e.g. from a quiet ``bench/train_throughput.py``, when the runs shared the machine), the allreduce a ring over
``--bandwidth-gbps`` / ``--latency-us`` of the model's float32 parameters; hours to target =
steps to target x that. Only N <= B (a node needs at least one example per step); the critical
batch (where doubling the batch stops halving the steps) is what limits N.
Writes OUT/table.md, OUT/time_to_quality.png, OUT/results.json; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import scaling_model  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--target-vi", type=float, required=True)
  p.add_argument("--labels", default="", help="comma-separated run names (default: folders)")
  p.add_argument("--test", action="append", default=[], metavar="NAME=JSON",
                 help="a run's test score: python -m ffn_jax.evaluate output (repeatable)")
  p.add_argument("--nodes", default="1,16,128,1024")
  p.add_argument("--fovs-per-s", type=float, default=0.0,
                 help="one node's training FOV/s for every run's projection (default: each "
                      "run's own median; runs measured beside other jobs are slower)")
  p.add_argument("--bandwidth-gbps", type=float, default=100.0)
  p.add_argument("--latency-us", type=float, default=2.0)
  p.add_argument("--out", default=os.path.join(_common.REPO, "runs", "time_to_quality"))
  args = p.parse_args(argv)
  args.nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
  args.labels = [s for s in args.labels.split(",") if s] or [
      os.path.basename(os.path.normpath(w)) for w in args.workdirs]
  if len(args.labels) != len(args.workdirs):
    p.error(f"{len(args.labels)} labels for {len(args.workdirs)} workdirs")
  tests = {}
  for item in args.test:
    name, _, path = item.partition("=")
    if name not in args.labels or not path:
      p.error(f"--test {item!r}: expected NAME=JSON with NAME one of {args.labels}")
    tests[name] = path
  args.tests = tests
  if args.target_vi <= 0:
    p.error("--target-vi must be > 0")
  return args


def run_config(workdir: str) -> dict:
  """The run's config as its newest checkpoint recorded it ({} if it has none yet)."""
  from ffn_jax import checkpoint
  try:
    return checkpoint.load_params(workdir)[1].get("config", {})
  except checkpoint.CheckpointError:
    return {}


def summarize(workdir: str, name: str, target: float, test_json: str | None) -> dict:
  records = _common.read_metrics(workdir)
  windows = _common.step_records(records)
  evals = [r for r in records if r.get("eval")]
  if not windows or not evals:
    raise SystemExit(f"error: {workdir} has no training windows or no eval records")
  config = run_config(workdir)
  optim = config.get("optim", {})
  batch = windows[-1]["global_batch"]
  fps = statistics.median(w["fovs_per_s"] for w in windows)
  row = {"name": name, "workdir": workdir, "global_batch": batch, "run_fovs_per_s": fps,
         "optimizer": optim.get("name"), "rule": optim.get("lr_scaling"),
         "base_lr": optim.get("learning_rate"), "warmup_steps": optim.get("warmup_steps"),
         "schedule": optim.get("schedule"), "ema_decay": optim.get("ema_decay", 0.0),
         "peak_lr": max(w["learning_rate"] for w in windows), "fovs_per_s": fps,
         "steps": windows[-1]["step"], "examples": windows[-1]["step"] * batch,
         "val_vi_last": evals[-1]["vi"], "val_vi_best": min(e["vi"] for e in evals),
         "evals": [{"step": e["step"], "examples": e.get("examples", e["step"] * batch),
                    "vi": e["vi"], "wall_s": e.get("wall_s")} for e in evals]}
  hit = next((e for e in evals if e["vi"] <= target), None)
  row.update(steps_to_target=None, examples_to_target=None, train_s_to_target=None,
             wall_s_to_target=None)
  if hit is not None:
    row.update(steps_to_target=hit["step"], examples_to_target=hit["step"] * batch,
               train_s_to_target=sum(_common.window_wall_s(w) for w in windows
                                     if w["step"] <= hit["step"]),
               wall_s_to_target=hit.get("wall_s"))
  row["test_vi"] = None
  if test_json:
    with open(test_json) as f:
      lines = [line for line in f.read().splitlines() if line.strip().startswith("{")]
    row["test_vi"] = json.loads(lines[-1])["vi"]
  return row


def project(row: dict, nodes: list[int], params: int, bandwidth_gbps: float,
            latency_us: float) -> dict:
  """Seconds to target on each node count (None where N > B or the target was not reached)."""
  out = {}
  for n in nodes:
    if row["steps_to_target"] is None or n > row["global_batch"]:
      out[str(n)] = None
      continue
    step_s = (row["global_batch"] / n) / row["fovs_per_s"] + scaling_model.allreduce_time(
        "ring", n, 4.0 * params, latency_us * 1e-6, bandwidth_gbps * 1e9 / 8)
    out[str(n)] = row["steps_to_target"] * step_s
  return out


def _fmt(v, spec):
  return "–" if v is None else format(v, spec)


def _duration(seconds) -> str:
  """Projected time to target: hours from 1 h, else minutes from 1 min, else seconds."""
  if seconds is None:
    return "–"
  if seconds >= 3600:
    return f"{seconds / 3600:.2f} h"
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def table(rows: list[dict], target: float, nodes: list[int]) -> str:
  head = ("| run | batch | optimizer | rule | peak LR | warmup | EMA | steps | examples to VI ≤ "
          f"{target:g} | steps to it | training min to it | last / best val VI | test VI | "
          + " | ".join(f"on {n}" for n in nodes) + " |")
  lines = [head, "|" + "---|" * (13 + len(nodes))]
  for r in rows:
    lines.append(
        f"| {r['name']} | {r['global_batch']} | {r['optimizer']} | {r['rule']} | "
        f"{r['peak_lr']:.2e} | {r['warmup_steps']} | {r['ema_decay']} | {r['steps']} | "
        f"{_fmt(r['examples_to_target'], ',')} | {_fmt(r['steps_to_target'], ',')} | "
        f"{_fmt(None if r['train_s_to_target'] is None else r['train_s_to_target'] / 60, '.1f')}"
        f" | {r['val_vi_last']:.3f} / {r['val_vi_best']:.3f} | {_fmt(r['test_vi'], '.3f')} | "
        + " | ".join(_duration(r["seconds_on"][str(n)]) for n in nodes) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], target: float, out: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_e, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
  for r in rows:
    ax_e.plot([e["examples"] for e in r["evals"]], [e["vi"] for e in r["evals"]], marker="o",
              ms=3, label=f"{r['name']} (batch {r['global_batch']})")
  ax_e.axhline(target, color="grey", ls="-.", lw=0.8)
  ax_e.set(xlabel="examples seen", ylabel="validation VI (bits)", title="validation VI")
  ax_e.legend(fontsize=7)
  reached = [r for r in rows if r["steps_to_target"] is not None]
  ax_s.scatter([r["global_batch"] for r in reached], [r["steps_to_target"] for r in reached])
  for r in reached:
    ax_s.annotate(r["name"], (r["global_batch"], r["steps_to_target"]), fontsize=7)
  ax_s.set(xlabel="global batch", ylabel=f"steps to VI <= {target:g}",
           title="steps to target (flat = critical batch)")
  if reached:  # log axes need a point; with none the panel stays empty, and says why
    ax_s.set(xscale="log", yscale="log")
  else:
    ax_s.text(0.5, 0.5, f"no run reached VI <= {target:g}", ha="center", va="center",
              transform=ax_s.transAxes)
  for ax in (ax_e, ax_s):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = _common.save_figure(fig, os.path.join(out, "time_to_quality.png"))
  plt.close(fig)
  return path


def main(argv=None) -> int:
  args = parse_args(argv)
  rows = []
  for workdir, name in zip(args.workdirs, args.labels):
    row = summarize(workdir, name, args.target_vi, args.tests.get(name))
    model = run_config(workdir).get("model", {})
    params = _common.param_count(int(model.get("depth", 1)), int(model.get("features", 1)))
    if args.fovs_per_s > 0:
      row["fovs_per_s"] = args.fovs_per_s
    row["seconds_on"] = project(row, args.nodes, params, args.bandwidth_gbps, args.latency_us)
    rows.append(row)
  os.makedirs(args.out, exist_ok=True)
  md = table(rows, args.target_vi, args.nodes)
  print(f"CPU: {_common.cpu_model()}; target validation VI {args.target_vi:g}")
  print(md)
  png = plot(rows, args.target_vi, args.out)
  result = _common.rounded({"benchmark": "time_to_quality", **_common.machine(),
                            "target_vi": args.target_vi, "nodes": args.nodes,
                            "bandwidth_gbps": args.bandwidth_gbps, "latency_us": args.latency_us,
                            "runs": rows, "plot": png,
                            "table": os.path.join(args.out, "table.md")})
  with open(result["table"], "w") as f:
    f.write(md + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  _common.emit_json({k: v for k, v in result.items() if k != "runs"})
  return 0


if __name__ == "__main__":
  sys.exit(main())
