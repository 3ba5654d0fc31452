"""Training throughput of one rank: FOV/s, GFLOP/s, and where each step's time goes.

    python bench/train_throughput.py --config configs/fib25.py --steps 4
    python bench/train_throughput.py --config configs/synthetic.py --steps 20 --cores 1 \
        --config.batch_size=8

Runs ``train_and_evaluate`` (the real training loop, recurrent FOV pipeline included) into a
temporary work directory for ``--warmup + --steps`` steps, logging every step, and reads
``metrics.jsonl`` back. The first ``--warmup`` steps (compilation) are discarded; the rest are
summarized as medians per step:

- compute: the pmapped gradient computation (``time_step_s``);
- update: the jitted allreduce + optimizer update (``time_allreduce_s``; one rank: no allreduce);
- input: the host input pipeline, ``next_batch`` (``time_data_s``);
- other host: the rest of the loop iteration (writing the output logits back into the recurrent
  seeds, metrics, logging).

Host overhead = (input + other host) / step wall time; the goal at FIB-25 scale is <= 10%.
GFLOP/s counts 3x the forward FLOPs of the conv stack per FOV (forward + backward), computed
from the config's depth, features and FOV (``bench/_common.gflop_forward``). ``--cores N`` pins
this process to N cores before JAX starts (XLA and oneDNN size their thread pools from the
affinity mask). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HOST_OVERHEAD_GOAL = 0.10


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description="Training throughput (FOV/s, GFLOP/s) and step-time breakdown of one rank.",
      epilog="Any --config.KEY=VALUE is applied to the config, as in train.py.")
  p.add_argument("--config", default="configs/synthetic.py", help="config file")
  p.add_argument("--steps", type=int, default=10, help="measured steps (after the warm-up)")
  p.add_argument("--warmup", type=int, default=1,
                 help="first steps discarded (the first one compiles)")
  p.add_argument("--cores", type=int, default=0,
                 help="pin to this many cores of the current affinity (0: leave as is)")
  p.add_argument("--workdir", default="", help="keep the run here instead of a temp dir")
  args, rest = p.parse_known_args(argv)
  args.overrides = _common.normalize_overrides(rest)
  if args.steps < 1 or args.warmup < 0:
    p.error("--steps must be >= 1 and --warmup >= 0")
  return args


def pin_cores(n: int) -> list[int]:
  cores = sorted(os.sched_getaffinity(0))
  if n > 0:
    if "jax" in sys.modules:
      raise RuntimeError("pin the cores before JAX is imported")
    cores = cores[:n]
    os.sched_setaffinity(0, cores)
  return cores


def measure(config, steps: int, warmup: int, workdir: str) -> dict:
  """Runs the training loop and returns the steady-state breakdown (seconds per step)."""
  from ffn_jax.training import loop
  config.max_steps = warmup + steps
  config.log_every = 1
  config.checkpoint_every = 10**9  # only the final save, after the measured steps
  config.sync_check_every = 0
  _common.fresh_workdir(workdir)
  t0 = time.perf_counter()
  loop.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  stats = _common.steady_state(_common.read_metrics(workdir), warmup)
  stats["run_wall_s"] = wall
  return stats


def summarize(config, stats: dict) -> dict:
  m = config.model
  gflop_fwd = _common.gflop_forward(m.depth, m.features, m.fov_size_zyx)
  wall = stats["step_wall_s"]
  host = stats["data_s"] + stats["other_s"]
  return {
      "fovs_per_s": stats["fovs_per_s"],
      "gflop_per_fov_forward": gflop_fwd,
      "gflop_per_fov_train": 3 * gflop_fwd,
      "gflops": 3 * gflop_fwd * stats["fovs_per_s"],
      "step_wall_s": wall,
      "compute_s": stats["compute_s"],
      "update_allreduce_s": stats["allreduce_s"],
      "data_s": stats["data_s"],
      "other_host_s": stats["other_s"],
      "compute_fraction": stats["compute_s"] / wall,
      "allreduce_fraction": stats["allreduce_s"] / wall,
      "host_overhead_fraction": host / wall,
      "host_overhead_goal": HOST_OVERHEAD_GOAL,
      "host_overhead_ok": host / wall <= HOST_OVERHEAD_GOAL,
      "step_wall_cv": stats["step_wall_cv"],
      "steps_measured": stats["steps_measured"],
      "first_measured_step": stats["first_measured_step"],
      "run_wall_s": stats["run_wall_s"],
      "global_batch": stats["global_batch"],
      "params": _common.param_count(m.depth, m.features),
  }


def report(name: str, config, conv_route: str, cores, result: dict, load: dict) -> None:
  m = config.model
  fov = "x".join(map(str, m.fov_size_zyx))
  print(f"config {name}: depth {m.depth}, features {m.features}, FOV {fov}, "
        f"batch {result['global_batch']}, conv route {conv_route}, 1 rank on {len(cores)} core(s) "
        f"{cores}")
  print(f"load average before {load['before']}, after {load['after']} (1/5/15 min)")
  print(f"conv stack: {result['gflop_per_fov_forward']:.2f} GFLOP/FOV forward, "
        f"{result['gflop_per_fov_train']:.2f} per training FOV (3x); "
        f"{result['params']:,} parameters")
  print(f"steady state: median of {result['steps_measured']} steps from step "
        f"{result['first_measured_step']} (step-time CV {result['step_wall_cv']:.2f})")
  wall = result["step_wall_s"]
  rows = [("compute (pmapped grads)", result["compute_s"]),
          ("update (+ allreduce)", result["update_allreduce_s"]),
          ("input pipeline", result["data_s"]),
          ("other host", result["other_host_s"])]
  for label, t in rows:
    print(f"  {label:<24} {t * 1e3:10.1f} ms  {100 * t / wall:5.1f} %")
  print(f"  {'step wall':<24} {wall * 1e3:10.1f} ms")
  verdict = "ok" if result["host_overhead_ok"] else "ABOVE GOAL"
  print(f"host overhead {100 * result['host_overhead_fraction']:.1f} % of the step "
        f"(goal <= {100 * HOST_OVERHEAD_GOAL:.0f} %: {verdict})")
  print(f"throughput {result['fovs_per_s']:.3f} FOV/s, {result['gflops']:.1f} GFLOP/s")


def main(argv=None) -> int:
  args = parse_args(argv)
  cores = pin_cores(args.cores)
  config = _common.load_config(args.config, args.overrides)
  from ffn_jax import conv
  route = conv.resolve(config.model.conv_impl)
  workdir = args.workdir or tempfile.mkdtemp(prefix="ffn_train_throughput_")
  load = {"before": _common.load_average()}
  try:
    stats = measure(config, args.steps, args.warmup, workdir)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  load["after"] = _common.load_average()
  result = summarize(config, stats)
  report(args.config, config, route, cores, result, load)
  out = {"benchmark": "train_throughput", "config": args.config, "overrides": args.overrides,
         "conv_impl": route, "cores": len(cores),
         "depth": config.model.depth, "features": config.model.features,
         "fov_size_zyx": list(config.model.fov_size_zyx), "loadavg": load,
         "step_wall_all_s": stats["step_wall_all_s"], **result}
  _common.emit_json(_common.rounded(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
