"""Communication cost model: projects synchronous FFN training efficiency to thousands of nodes.

    python bench/scaling_model.py --measure --scaling-json runs/scaling/scaling.json
    python bench/scaling_model.py --compute-s 1.4 --bandwidth-gbps 100 --latency-us 2

A synchronous data-parallel step is ``compute + allreduce(gradients)`` (ffn_jax allreduces once,
after the backward pass, without overlap), and with R ranks the step waits for the slowest one.
For N nodes:

    ring allreduce  T = 2 (N-1) alpha + 2 (N-1)/N * bytes / bandwidth
    tree allreduce  T = 2 ceil(log2 N) (alpha + bytes / bandwidth)   (binomial reduce + bcast)
    stragglers      E[max of N step times] = compute * (1 + cv * E[max of N std. normals])
    efficiency      = compute / (compute * (1 + cv * E[max Z_N]) + T)

Inputs, and whether they are measured or assumed:
- per-step compute time: MEASURED by bench/scaling.py on this machine (``--scaling-json``, the
  1-rank step) or given (``--compute-s``); the paper's KNL node is modelled as
  ``--paper-batch-per-node`` FOVs at ~0.7 FOV/s.
- message size: the model's parameters x 4 bytes (638,433 float32 for FIB-25).
- interconnect: ``--bandwidth-gbps`` / ``--latency-us`` (defaults: an Omni-Path-class 100 Gb/s
  fabric, ~2 us MPI latency); ``--measure`` also MEASURES alpha/beta of MPI_Allreduce between 2
  ranks on this machine (shared memory, a sanity check of the model at N = 2, not a network).
- straggler jitter ``cv``: ``--jitter-cv``; by default the value that makes the model meet the
  paper's 2048-node point is FITTED and reported as such.
Everything at N > 2 is PROJECTED. Writes OUT/scaling_model.json and OUT/scaling_model.png; the
last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

FIB25_PARAMS = 638_433
# Dong et al., SC19 DLS workshop ("Scaling Distributed Training of Flood-Filling Networks on HPC
# Infrastructure for Brain Mapping"), FFN training on Theta's KNL nodes with Horovod. Only the
# points we are confident of, as approximate read-offs: about 0.7 training FOV/s per KNL node, and
# about 68 % weak-scaling efficiency at 2048 nodes (1 node is the reference, 100 %).
PAPER_FOVS_PER_NODE = 0.7
PAPER_EFFICIENCY = {1: 1.0, 2048: 0.68}
ALGORITHMS = ("ring", "tree")


# -- the model ----------------------------------------------------------------------------------
def allreduce_time(algorithm: str, nodes: int, nbytes: float, latency_s: float,
                   bandwidth_bytes_per_s: float) -> float:
  """Seconds for one allreduce of ``nbytes`` over ``nodes`` (alpha-beta model)."""
  if nodes <= 1:
    return 0.0
  beta = 0.0 if math.isinf(bandwidth_bytes_per_s) else 1.0 / bandwidth_bytes_per_s
  if algorithm == "ring":
    return 2 * (nodes - 1) * latency_s + 2 * (nodes - 1) / nodes * nbytes * beta
  if algorithm == "tree":
    return 2 * math.ceil(math.log2(nodes)) * (latency_s + nbytes * beta)
  raise ValueError(f"unknown allreduce algorithm {algorithm!r}; choose one of {ALGORITHMS}")


def expected_max_normal(n: int) -> float:
  """E[max of n standard normals] (Blom's approximation; 0 for n = 1, 0.59 for n = 2)."""
  if n <= 1:
    return 0.0
  return statistics.NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


def projected_efficiency(compute_s: float, nodes: int, nbytes: float, latency_s: float,
                         bandwidth_bytes_per_s: float, algorithm: str = "ring",
                         jitter_cv: float = 0.0) -> float:
  """Weak-scaling efficiency of a synchronous step at ``nodes`` (1.0 = perfect)."""
  slowest = compute_s * (1.0 + jitter_cv * expected_max_normal(nodes))
  comm = allreduce_time(algorithm, nodes, nbytes, latency_s, bandwidth_bytes_per_s)
  return compute_s / (slowest + comm)


def fit_jitter_cv(target: float, compute_s: float, nodes: int, nbytes: float, latency_s: float,
                  bandwidth: float, algorithm: str = "ring") -> float:
  """The step-time CV at which the model gives efficiency ``target`` at ``nodes`` (bisection)."""
  lo, hi = 0.0, 10.0
  if projected_efficiency(compute_s, nodes, nbytes, latency_s, bandwidth, algorithm) <= target:
    return 0.0
  for _ in range(100):
    mid = (lo + hi) / 2
    eff = projected_efficiency(compute_s, nodes, nbytes, latency_s, bandwidth, algorithm, mid)
    lo, hi = (mid, hi) if eff > target else (lo, mid)
  return (lo + hi) / 2


def node_counts(max_nodes: int) -> list[int]:
  out, n = [], 1
  while n < max_nodes:
    out.append(n)
    n *= 2
  return out + [max_nodes]


# -- measurement ----------------------------------------------------------------------------------
def allreduce_worker(n_params: int, repeats: int) -> None:
  """Under ``mpirun -n 2``: times MPI_Allreduce (mpi4py) over sizes and mpi4jax at the model
  size; rank 0 prints one JSON line."""
  import numpy as np
  from mpi4py import MPI
  comm = MPI.COMM_WORLD
  sizes = sorted({1, 256, 4096, 65536, 262144, n_params})
  times = {}
  for n in sizes:
    send, recv = np.ones(n, np.float32), np.empty(n, np.float32)
    samples = []
    for i in range(repeats + 3):
      comm.Barrier()
      t0 = time.perf_counter()
      comm.Allreduce(send, recv, op=MPI.SUM)
      if i >= 3:
        samples.append(time.perf_counter() - t0)
    times[n] = statistics.median(samples)
  import jax
  import mpi4jax
  flat = jax.numpy.ones(n_params, jax.numpy.float32)
  reduce = jax.jit(lambda x: mpi4jax.allreduce(x, op=MPI.SUM, comm=comm) / 2)
  jax.block_until_ready(reduce(flat))
  samples = []
  for _ in range(repeats):
    comm.Barrier()
    t0 = time.perf_counter()
    jax.block_until_ready(reduce(flat))
    samples.append(time.perf_counter() - t0)
  if comm.Get_rank() == 0:
    print(json.dumps({"ranks": comm.Get_size(), "float32_elements": sizes,
                      "mpi4py_s": [times[n] for n in sizes],
                      "mpi4jax_model_size_s": statistics.median(samples)}), flush=True)


def fit_alpha_beta(nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
  """alpha, beta of a 2-rank ring (T = 2 alpha + bytes * beta) from allreduce timings.

  alpha from the smallest message (latency-bound), beta from the slope between the smallest
  and the largest (bandwidth-bound); a least-squares line would let the large messages' noise
  swamp the microseconds of latency.
  """
  pairs = sorted(zip(nbytes, seconds))
  (b0, t0), (b1, t1) = pairs[0], pairs[-1]
  beta = max((t1 - t0) / (b1 - b0), 1e-15)
  return max(t0 - b0 * beta, 0.0) / 2, beta


def measure_allreduce(n_params: int, repeats: int = 20) -> dict:
  mpirun = _common.mpirun_path()
  if mpirun is None:
    raise SystemExit("error: mpirun not found (install the mpich wheel into the venv)")
  cmd = [mpirun, "-n", "2", "-bind-to", "core", sys.executable, os.path.abspath(__file__),
         "--allreduce-worker", "--params", str(n_params), "--repeats", str(repeats)]
  proc = subprocess.run(cmd, env=_common.child_env(OMP_NUM_THREADS=1), capture_output=True,
                        text=True, timeout=600)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    raise SystemExit(f"error: allreduce microbenchmark failed:\n{proc.stderr[-2000:]}")
  m = json.loads(lines[-1])
  nbytes = [4.0 * n for n in m["float32_elements"]]
  alpha, beta = fit_alpha_beta(nbytes, m["mpi4py_s"])
  m.update(alpha_s=alpha, bandwidth_bytes_per_s=1.0 / beta, loadavg=_common.load_average())
  return m


def from_scaling_json(path: str) -> dict:
  """The measured 1-rank step and the measured allreduce at the largest R (weak scaling)."""
  with open(path) as f:
    s = json.load(f)
  pts = s.get("weak") or s.get("strong")
  base, top = pts[0], pts[-1]
  return {"source": path, "config": s["config"], "base_ranks": base["ranks"],
          "batch_per_rank": base["batch_per_rank"], "compute_s": base["step_wall_s"],
          "fovs_per_s_per_rank": base["fovs_per_s"] / base["ranks"],
          "step_wall_cv": base["step_wall_cv"], "top_ranks": top["ranks"],
          "top_efficiency": top["efficiency"],
          "top_cpu_normalized_efficiency": top.get("cpu_normalized_efficiency"),
          "top_allreduce_minus_update_s": top["allreduce_s"] - base["allreduce_s"]}


# -- output ----------------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Project FFN training efficiency to N nodes.")
  p.add_argument("--scaling-json", default="", help="bench/scaling.py output (measured inputs)")
  p.add_argument("--compute-s", type=float, default=0.0,
                 help="per-step compute time of one rank (overrides --scaling-json)")
  p.add_argument("--fovs-per-s-per-rank", type=float, default=0.0,
                 help="with --compute-s: one rank's throughput (for the throughput plot)")
  p.add_argument("--params", type=int, default=FIB25_PARAMS, help="float32 parameters")
  p.add_argument("--bandwidth-gbps", type=float, default=100.0,
                 help="interconnect bandwidth per node, Gbit/s (default: Omni-Path class)")
  p.add_argument("--latency-us", type=float, default=2.0, help="MPI latency per message, us")
  p.add_argument("--jitter-cv", type=float, default=-1.0,
                 help="step-time CV for the straggler term (default: fit the paper's point)")
  p.add_argument("--paper-batch-per-node", type=int, default=1,
                 help="FOVs per KNL node per step for the paper-node curves (assumed)")
  p.add_argument("--max-nodes", type=int, default=2048)
  p.add_argument("--measure", action="store_true",
                 help="measure MPI_Allreduce alpha/beta over 2 ranks on this machine")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--out", default=os.path.join(_common.REPO, "runs", "scaling_model"))
  p.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def project(args, measured: dict) -> dict:
  nbytes = 4.0 * args.params
  bw = args.bandwidth_gbps * 1e9 / 8
  lat = args.latency_us * 1e-6
  nodes = node_counts(args.max_nodes)
  paper_compute = args.paper_batch_per_node / PAPER_FOVS_PER_NODE
  fitted = args.jitter_cv < 0
  cv = (fit_jitter_cv(PAPER_EFFICIENCY[2048], paper_compute, 2048, nbytes, lat, bw, "ring")
        if fitted else args.jitter_cv)
  curves = {}
  for algo in ALGORITHMS:
    curves[f"paper_node_{algo}"] = [projected_efficiency(paper_compute, n, nbytes, lat, bw, algo)
                                    for n in nodes]
  curves["paper_node_ring_stragglers"] = [
      projected_efficiency(paper_compute, n, nbytes, lat, bw, "ring", cv) for n in nodes]
  ours = measured.get("compute_s")
  if ours:
    for algo in ALGORITHMS:
      curves[f"ours_{algo}"] = [projected_efficiency(ours, n, nbytes, lat, bw, algo)
                                for n in nodes]
  comm = {algo: allreduce_time(algo, args.max_nodes, nbytes, lat, bw) for algo in ALGORITHMS}
  out = {"nodes": nodes, "efficiency": curves, "jitter_cv": cv, "jitter_cv_fitted": fitted,
         "allreduce_s_at_max_nodes": comm, "message_bytes": nbytes,
         "bandwidth_gbps": args.bandwidth_gbps, "latency_us": args.latency_us,
         "paper_node_compute_s": paper_compute}
  if "alpha_s" in measured:
    # The model at N = 2 with this machine's measured alpha/beta, against the allreduce time
    # measured inside training (2-rank allreduce+update minus the 1-rank update).
    out["model_check_2_ranks"] = {
        "predicted_allreduce_s": allreduce_time("ring", 2, nbytes, measured["alpha_s"],
                                                measured["bandwidth_bytes_per_s"]),
        "microbench_mpi4jax_s": measured.get("mpi4jax_model_size_s"),
        "in_training_s": measured.get("top_allreduce_minus_update_s")}
  return out


def plot(args, measured: dict, proj: dict, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  nodes, eff = proj["nodes"], proj["efficiency"]
  fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(10, 3.8))
  net = f"{args.bandwidth_gbps:g} Gb/s, {args.latency_us:g} us"
  cv_label = f"cv={proj['jitter_cv']:.3f}{' fitted' if proj['jitter_cv_fitted'] else ''}"
  styles = [("paper_node_ring", "tab:blue", "-", f"KNL-node step, ring ({net})"),
            ("paper_node_tree", "tab:blue", ":", "KNL-node step, tree"),
            ("paper_node_ring_stragglers", "tab:purple", "-.",
             f"KNL-node step, ring + stragglers ({cv_label})"),
            ("ours_ring", "tab:green", "-", "our 1-core step (measured), ring"),
            ("ours_tree", "tab:green", ":", "our 1-core step, tree")]
  for key, color, ls, label in styles:
    if key in eff:
      ax_e.plot(nodes, eff[key], ls, color=color, label=f"projected: {label}")
  ax_e.plot(list(PAPER_EFFICIENCY), list(PAPER_EFFICIENCY.values()), "k*", ms=10,
            label="paper (Dong et al. 2019, approx.)")
  if measured.get("top_efficiency") is not None:
    ax_e.plot([measured["top_ranks"]], [measured["top_efficiency"]], "rs",
              label="measured here (2 ranks, shared machine)")
  if measured.get("top_cpu_normalized_efficiency") is not None:
    ax_e.plot([measured["top_ranks"]], [measured["top_cpu_normalized_efficiency"]], "rs",
              mfc="none", label="measured here, per CPU-second obtained")
  ax_e.set(xscale="log", xlabel="nodes", ylabel="weak-scaling efficiency", ylim=(0, 1.05),
           title="efficiency: projected (lines) vs published/measured (markers)")
  ax_e.set_xscale("log", base=2)
  # Throughput: the paper's node rate times the projected efficiency.
  paper_thr = [PAPER_FOVS_PER_NODE * n * e
               for n, e in zip(nodes, eff["paper_node_ring_stragglers"])]
  ax_t.plot(nodes, [PAPER_FOVS_PER_NODE * n for n in nodes], "--", color="gray",
            label="ideal at 0.7 FOV/s/node")
  ax_t.plot(nodes, paper_thr, "-.", color="tab:purple", label="projected: KNL node + stragglers")
  ax_t.plot(list(PAPER_EFFICIENCY),
            [PAPER_FOVS_PER_NODE * n * e for n, e in PAPER_EFFICIENCY.items()], "k*", ms=10,
            label="paper (approx.)")
  if measured.get("fovs_per_s_per_rank") and "ours_ring" in eff:
    thr = measured["fovs_per_s_per_rank"]
    ax_t.plot(nodes, [thr * n * e for n, e in zip(nodes, eff["ours_ring"])], color="tab:green",
              label="projected: our 1-core rank, ring")
  ax_t.set(xlabel="nodes", ylabel="training FOV/s", title="throughput")
  ax_t.set_xscale("log", base=2)
  ax_t.set_yscale("log")
  for ax in (ax_e, ax_t):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower left" if ax is ax_e else "upper left")
  fig.tight_layout()
  _common.save_figure(fig, path)
  plt.close(fig)
  return path


def report(args, measured: dict, proj: dict) -> None:
  print("MEASURED on this machine:" if measured else "MEASURED: nothing (all inputs given)")
  if "compute_s" in measured:
    src = measured.get("source", "--compute-s")
    print(f"  per-step compute of one rank: {measured['compute_s']:.3f} s ({src})")
  if "alpha_s" in measured:
    print(f"  MPI_Allreduce, 2 ranks (shared memory): alpha {measured['alpha_s'] * 1e6:.1f} us, "
          f"bandwidth {measured['bandwidth_bytes_per_s'] * 8 / 1e9:.1f} Gb/s; mpi4jax at "
          f"{args.params:,} floats: {measured['mpi4jax_model_size_s'] * 1e3:.2f} ms "
          f"(load {measured['loadavg'][0]})")
    print("    mpi4py MPI_Allreduce medians: " + ", ".join(
        f"{n * 4:,} B {t * 1e6:.0f} us"
        for n, t in zip(measured["float32_elements"], measured["mpi4py_s"])))
  if "model_check_2_ranks" in proj:
    c = proj["model_check_2_ranks"]
    got = c["in_training_s"]
    print(f"  model check at 2 ranks: predicted allreduce {c['predicted_allreduce_s'] * 1e3:.2f} ms"
          f", microbenchmark {c['microbench_mpi4jax_s'] * 1e3:.2f} ms"
          + (f", in training (incl. waiting for the slower rank) {got * 1e3:.2f} ms"
             if got is not None else ""))
  print(f"PAPER (constants): {PAPER_FOVS_PER_NODE} FOV/s per KNL node; efficiency "
        f"{PAPER_EFFICIENCY}")
  print(f"PROJECTED ({args.params:,} float32 = {proj['message_bytes'] / 1e6:.2f} MB per "
        f"allreduce, {args.bandwidth_gbps:g} Gb/s, {args.latency_us:g} us): allreduce at "
        f"{args.max_nodes} nodes: ring {proj['allreduce_s_at_max_nodes']['ring'] * 1e3:.2f} ms, "
        f"tree {proj['allreduce_s_at_max_nodes']['tree'] * 1e3:.2f} ms")
  what = "fitted to the paper's 2048-node point" if proj["jitter_cv_fitted"] else "given"
  print(f"  straggler step-time CV {proj['jitter_cv']:.3f} ({what})")
  keys = list(proj["efficiency"])
  print("  nodes  " + "  ".join(f"{k:>26s}" for k in keys))
  for i, n in enumerate(proj["nodes"]):
    print(f"  {n:5d}  " + "  ".join(f"{proj['efficiency'][k][i]:26.3f}" for k in keys))


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.allreduce_worker:
    allreduce_worker(args.params, args.repeats)
    return 0
  measured = {}
  if args.scaling_json:
    measured.update(from_scaling_json(args.scaling_json))
  if args.compute_s > 0:
    measured.update(compute_s=args.compute_s, source="--compute-s")
    if args.fovs_per_s_per_rank > 0:
      measured["fovs_per_s_per_rank"] = args.fovs_per_s_per_rank
  if args.measure:
    measured.update(measure_allreduce(args.params, args.repeats))
  proj = project(args, measured)
  os.makedirs(args.out, exist_ok=True)
  png = plot(args, measured, proj, os.path.join(args.out, "scaling_model.png"))
  report(args, measured, proj)
  result = _common.rounded({"benchmark": "scaling_model", "measured": measured,
                            "projected": proj, "paper": {"fovs_per_s_per_node":
                                                         PAPER_FOVS_PER_NODE,
                                                         "efficiency": PAPER_EFFICIENCY},
                            "plot": png}, 6)
  with open(os.path.join(args.out, "scaling_model.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {png}")
  top = {k: v[-1] for k, v in proj["efficiency"].items()}
  _common.emit_json(_common.rounded(
      {"benchmark": "scaling_model", "max_nodes": args.max_nodes,
       "projected_efficiency_at_max_nodes": top, "jitter_cv": proj["jitter_cv"],
       "jitter_cv_fitted": proj["jitter_cv_fitted"],
       "measured_compute_s": measured.get("compute_s"),
       "measured_alpha_us": measured["alpha_s"] * 1e6 if "alpha_s" in measured else None,
       "measured_bandwidth_gbps": (measured["bandwidth_bytes_per_s"] * 8e-9
                                   if "alpha_s" in measured else None),
       "json": os.path.join(args.out, "scaling_model.json")}, 4))
  return 0


if __name__ == "__main__":
  sys.exit(main())
