"""Plumbing shared by the training benchmarks in ``bench/``.

Configs are loaded with the project's own command-line parser (so ``--config.KEY=VALUE``
overrides behave exactly as in ``train.py``); runs go through ``train_and_evaluate`` into a work
directory and are read back from its ``metrics.jsonl``. Nothing here imports JAX at module level:
``train_throughput.py`` pins the CPU affinity before JAX starts its thread pools.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


# -- configs --------------------------------------------------------------------------------------
def config_path(path: str) -> str:
  """A config file given relative to the repository (``configs/tiny.py``) or to the cwd."""
  if os.path.exists(path):
    return os.path.abspath(path)
  in_repo = os.path.join(REPO, path)
  return in_repo if os.path.exists(in_repo) else path


def normalize_overrides(overrides) -> list[str]:
  """``KEY=VALUE`` or ``--config.KEY=VALUE`` -> ``--config.KEY=VALUE``."""
  out = []
  for o in overrides:
    o = o.strip()
    if not o:
      continue
    if not o.startswith("--"):
      o = "--config." + o
    if not o.startswith("--config."):
      raise SystemExit(f"error: unknown argument {o!r} (config overrides look like "
                       "--config.KEY=VALUE)")
    out.append(o)
  return out


def load_config(path: str, overrides=()):
  """The ConfigDict of ``path`` with overrides applied, exactly as ``train.py`` would see it."""
  from ffn_jax import cli
  from ffn_jax.errors import UserError
  path = config_path(path)
  argv = ["bench", "--config", path, "--workdir", "_unused", *normalize_overrides(overrides)]
  try:
    config, _ = cli.parse(argv, path, "bench")
  except UserError as e:
    raise SystemExit(f"error: {e}") from None
  return config


# -- model arithmetic ------------------------------------------------------------------------------
def conv_macs_per_voxel(depth: int, features: int, in_channels: int = 2) -> int:
  """Multiply-adds per output voxel of the FFN conv stack (``ffn_jax.model.FFN``).

  conv0_a (3^3, in->F), conv0_b and two convs per residual module (3^3, F->F: 2*depth-1 of them),
  and the 1^3 F->1 output conv. Biases, ReLUs and adds are not counted.
  """
  return 27 * in_channels * features + (2 * depth - 1) * 27 * features * features + features


def gflop_forward(depth: int, features: int, fov_size_zyx) -> float:
  """Forward GFLOP (2 x MACs) of the conv stack for one FOV (SAME padding: every voxel)."""
  return 2.0 * conv_macs_per_voxel(depth, features) * math.prod(fov_size_zyx) / 1e9


def param_count(depth: int, features: int, in_channels: int = 2) -> int:
  """Parameters of ``FFN(depth, features)`` (638,433 for FIB-25's depth 12, 32 features)."""
  first = 27 * in_channels * features + features
  middle = (2 * depth - 1) * (27 * features * features + features)
  return first + middle + features + 1


# -- runs ------------------------------------------------------------------------------------------
def partition_cache_dir() -> str:
  """A persistent folder for the partition/coordinate cache, shared by all benchmark runs.

  ``train_and_evaluate`` caches coordinates in ``WORKDIR/cache``; benchmarks run into fresh work
  directories, so they link that folder here to avoid recomputing FIB-25's partitions each run.
  """
  root = os.environ.get("FFN_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ffn_jax")
  return os.path.join(root, "bench_partitions")


def fresh_workdir(workdir: str, share_partition_cache: bool = True) -> str:
  """Empties ``workdir`` (a run there must not resume) and links its partition cache."""
  workdir = os.path.abspath(workdir)
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  if share_partition_cache:
    cache = partition_cache_dir()
    os.makedirs(cache, exist_ok=True)
    os.symlink(cache, os.path.join(workdir, "cache"))
  return workdir


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def step_records(records: list[dict]) -> list[dict]:
  """The per-window training records (not the final or eval records), each with
  ``window_steps`` added."""
  out, prev = [], 0
  for r in records:
    if any(r.get(k) for k in ("final", "eval", "calibration", "target")):
      continue
    out.append({**r, "window_steps": r["step"] - prev, "window_start": prev})
    prev = r["step"]
  return out


def window_wall_s(record: dict) -> float:
  """Wall time of one logged window: steps x global batch / (FOV/s)."""
  return record["window_steps"] * record["global_batch"] / record["fovs_per_s"]


def steady_state(records: list[dict], warmup_steps: int) -> dict:
  """Per-step times after the first ``warmup_steps`` steps (compile, caches), as medians.

  Uses the windows that start at or after ``warmup_steps``. ``step_wall_s`` is the whole loop
  iteration; ``other_s`` is what lies outside the three timed phases (writing the logits back
  into the recurrent seeds, metrics, logging).
  """
  windows = [r for r in step_records(records) if r["window_start"] >= warmup_steps]
  if not windows:
    raise ValueError(f"no logged steps after the {warmup_steps} warm-up steps; run more steps")
  wall = [window_wall_s(r) / r["window_steps"] for r in windows]
  med = lambda key: statistics.median(r[key] for r in windows)  # noqa: E731
  step_wall = statistics.median(wall)
  out = {
      "steps_measured": sum(r["window_steps"] for r in windows),
      "first_measured_step": windows[0]["window_start"] + 1,
      "global_batch": windows[0]["global_batch"],
      "ranks": windows[0]["ranks"],
      "step_wall_s": step_wall,
      "compute_s": med("time_step_s"),
      "allreduce_s": med("time_allreduce_s"),
      "data_s": med("time_data_s"),
      "fovs_per_s": windows[0]["global_batch"] / step_wall,
      "step_wall_cv": (statistics.pstdev(wall) / statistics.mean(wall)) if len(wall) > 1 else 0.0,
      "step_wall_all_s": wall,
  }
  out["other_s"] = max(step_wall - out["compute_s"] - out["allreduce_s"] - out["data_s"], 0.0)
  return out


# -- shared data ------------------------------------------------------------------------------------
# Cubic crops of FIB-25 training_sample2 used by the inference benchmarks: zyx start, size.
FIB25_CROPS = {"c64": (93, 64), "c100": (75, 100), "c150": (50, 150)}


def shared_data_dir() -> str:
  """``../shared/data`` beside the checkout, or ``$FFN_SHARED_DATA`` (as the tests read it)."""
  return os.environ.get("FFN_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))


# -- machine and output ----------------------------------------------------------------------------
def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
  """The CPU's model name (as lscpu shows it), or the architecture where /proc has none."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform
  return platform.processor() or platform.machine()


def machine() -> dict:
  return {"cpu": cpu_model(), "cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
          "loadavg": load_average()}


def mpirun_path() -> str | None:
  here = os.path.dirname(sys.executable)
  return shutil.which("mpirun", path=here) or shutil.which("mpirun")


def child_env(**extra) -> dict:
  """The environment for a child launch: no inherited MPI rank variables, the venv on PATH."""
  env = dict(os.environ)
  for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS",
            "FFN_JAX_MPI"):
    env.pop(k, None)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  env.setdefault("PYTHONUNBUFFERED", "1")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def save_figure(fig, path: str, max_bytes: int = 200_000) -> str:
  """Saves a small PNG (docs keep each < 200 KB); lowers the resolution until it fits."""
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  for dpi in (90, 72, 56, 40):
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if os.path.getsize(path) <= max_bytes:
      break
  return path


def emit_json(obj: dict) -> None:
  """The last line of every benchmark's output: one JSON object."""
  print(json.dumps(obj, sort_keys=True, default=_json_default), flush=True)


def _json_default(x):
  try:
    return x.item()
  except AttributeError:
    return str(x)


def rounded(x, digits: int = 4):
  """Floats in nested dicts/lists rounded for readable JSON."""
  if isinstance(x, float):
    return round(x, digits) if math.isfinite(x) else x
  if isinstance(x, dict):
    return {k: rounded(v, digits) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [rounded(v, digits) for v in x]
  return x
