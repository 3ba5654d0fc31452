"""Host cost of the recurrent training input pipeline, in ms per FOV, without a model.

    python bench/host_pipeline.py --config configs/fib25.py --config.batch_size=64

Builds the config's ``RecurrentExamples`` (the real training volumes, sampler and slots) and
times ``next_batch`` (batch assembly, new examples, augmentation) and ``update`` (writing the
model's output back into the slots' seeds) over ``--steps`` batches. A model is stood in for by
two outputs that bound the pipeline's work:

- ``oracle``: the logits of a perfect model (+3 on the centre object, -3 elsewhere), so FOVs
  move through the object as they do with a trained model and examples last many steps;
- ``reject``: -3 everywhere (an untrained model), so no move passes the threshold and every
  slot starts a new example at every step: the most host work per FOV.

Each mode runs without and with ``data.prefetch_examples`` (new examples cut ahead in a
background thread; batches are bit-identical). A device step is stood in for by a sleep of
``--step-ms`` per batch after ``next_batch`` (default 213.5 ms: the measured compute of a batch
of 64 FIB-25 FOVs on one H100), during which the prefetch thread works, as it would beside a GPU.
Reports the median over ``--repeats`` passes of the host time on the critical path (the time
``next_batch`` and ``update`` take in the loop's thread) in ms per FOV, and new examples per batch.
The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

MODES = ("oracle", "reject")
WARMUP = 2


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              epilog="Any --config.KEY=VALUE is applied to the config.")
  p.add_argument("--config", default="configs/fib25.py", help="config file")
  p.add_argument("--steps", type=int, default=40, help="batches per pass")
  p.add_argument("--repeats", type=int, default=5, help="passes per mode (median reported)")
  p.add_argument("--modes", default=",".join(MODES), help="comma-separated: oracle, reject")
  p.add_argument("--step-ms", type=float, default=213.5,
                 help="simulated device time per batch (sleep), ms")
  args, rest = p.parse_known_args(argv)
  args.overrides = _common.normalize_overrides(rest)
  args.modes = [m for m in args.modes.split(",") if m]
  if args.steps < 1 or args.repeats < 1 or not set(args.modes) <= set(MODES) or not args.modes:
    p.error(f"--steps and --repeats must be >= 1 and --modes a subset of {MODES}")
  return args


def build(config, prefetch: int = 0):
  """The config's RecurrentExamples for rank 0 of 1 (coordinates from the shared cache)."""
  from ffn_jax.data import partitions
  from ffn_jax.data.examples import RecurrentExamples
  from ffn_jax.training import data
  image, labels, block = data.load_training_volumes(config)
  d = config.data
  coords = partitions.cached_coordinates(
      labels, d.thresholds, d.lom_radius_zyx, d.min_size, tuple(int(b) // 2 for b in block),
      _common.partition_cache_dir(), lambda msg: None)
  sampler = partitions.BalancedSampler(coords, config.seed, 0, 1)
  return RecurrentExamples(image, labels, sampler, config.batch_size, config.model.fov_size_zyx,
                           config.model.deltas_zyx, d.fov_moves, d.move_threshold, d.augment,
                           config.seed, 0, prefetch)


def one_pass(config, mode: str, steps: int, prefetch: int, step_s: float) -> dict:
  import numpy as np
  examples = build(config, prefetch)
  batch_s = update_s = 0.0
  started = 0
  for i in range(WARMUP + steps):
    if i == WARMUP:  # the first batches draw the sampler's first permutation and fill slots
      batch_s = update_s = 0.0
      started = examples.examples_started
    t = time.perf_counter()
    batch = examples.next_batch()
    batch_s += time.perf_counter() - t
    time.sleep(step_s)
    if mode == "oracle":
      logits = np.where(batch["labels"] > 0.5, np.float32(3.0), np.float32(-3.0))
    else:
      logits = np.full_like(batch["labels"], -3.0)
    t = time.perf_counter()
    examples.update(logits)
    update_s += time.perf_counter() - t
  examples.close()
  fovs = steps * config.batch_size
  return {"next_batch_ms_per_fov": 1e3 * batch_s / fovs,
          "update_ms_per_fov": 1e3 * update_s / fovs,
          "host_ms_per_fov": 1e3 * (batch_s + update_s) / fovs,
          "new_examples_per_batch": (examples.examples_started - started) / steps}


def main(argv=None):
  args = parse_args(argv)
  config = _common.load_config(args.config, args.overrides)
  b = config.batch_size
  print(f"host pipeline: {args.config}, batch {b}, {args.steps} batches x {args.repeats} passes, "
        f"simulated device step {args.step_ms} ms; CPU {_common.cpu_model()}", flush=True)
  results = {}
  for mode in args.modes:
    settings = (("", 0), ("prefetch_", b))
    passes = {name: [] for name, _ in settings}
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
      for name, prefetch in settings:
        passes[name].append(one_pass(config, mode, args.steps, prefetch, args.step_ms / 1e3))
    for name, prefetch in settings:
      runs = passes[name]
      r = results[name + mode] = {k: statistics.median(p[k] for p in runs) for k in runs[0]}
      print(f"{mode:7s} prefetch {prefetch:3d}: host {r['host_ms_per_fov']:.3f} ms/FOV "
            f"(next_batch {r['next_batch_ms_per_fov']:.3f}, update "
            f"{r['update_ms_per_fov']:.3f}); {r['new_examples_per_batch']:.1f} new examples "
            "per batch", flush=True)
    r0, r1 = results[mode], results["prefetch_" + mode]
    results[f"{mode}_speedup"] = {"host": r0["host_ms_per_fov"] / r1["host_ms_per_fov"]}
  _common.emit_json(_common.rounded({
      "config": args.config, "batch_size": config.batch_size, "steps": args.steps,
      "repeats": args.repeats, "step_ms": args.step_ms,
      **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()},
      "machine": _common.machine()}))


if __name__ == "__main__":
  main()
