"""Which global batch size and learning-rate rule train FFN fastest (Dong et al.'s study, reusable).

    python bench/lr_batch_study.py                                  # synthetic, a few minutes
    python bench/lr_batch_study.py --batches 4,16,64 --rules none,linear,sqrt \
        --optimizers adam,momentum --warmup-steps 0,10 --budget-examples 2000
    python bench/lr_batch_study.py --config configs/fib25.py --batches 4,8 --budget-seconds 600

Every combination of global batch (emulated on one rank with ``config.batch_size``), LR scaling
rule (``optim.lr_scaling`` against ``optim.reference_batch``), warmup and optimizer is trained with
``train_and_evaluate`` for the same budget: a number of training examples (FOVs), or a wall-clock
of training time (the loop's logged time, setup excluded; the run is then stopped with SIGTERM,
which makes the loop save a checkpoint and stop).

Recorded per run: time-to-F1 (the first logged step where the training F1, averaged over the
last ``--f1-smooth`` logged windows, is >= ``--f1-target``; as steps, examples and seconds of this
machine's training loop, compilation included), the last
training loss/F1, and the loss on a held-out region: the final checkpoint
(``ffn_jax.checkpoint.load_params``) is applied once to ``--val-fovs`` FOVs sampled (class-
balanced, fixed seed, the same FOVs for every run) from data the run never trained on, each with
the first-step seed of training (logit(0.05), logit(0.95) at the centre), and scored with the
training loss against soft labels; and held-out segmentation VI: the final parameters flood the
whole held-out region with the training loop's segmentation eval (``config.eval``'s settings,
infer.py's code) and VI / adapted Rand are scored against its labels (``--no-eval-vi`` skips it). Held-out data: synthetic configs generate a second volume with
``--val-seed``; real-data configs hold out the last ``--val-fraction`` of the training box along y
(training is restricted to the rest), so the reserved evaluation regions stay untouched.

Steps-to-F1 is what carries over to a cluster (R ranks sharing the global batch take about as many
steps, each as long as one rank's step at the per-rank batch). Writes OUT/results.json,
OUT/table.md and two PNGs; the last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _csv(text, cast=str):
  return [cast(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description="Sweep global batch x LR scaling rule x warmup x optimizer at a fixed budget.",
      epilog="Any --config.KEY=VALUE is applied to every run.")
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--batches", default="4,16,64", help="global batch sizes (1 rank)")
  p.add_argument("--rules", default="none,linear,sqrt", help="LR scaling rules")
  p.add_argument("--optimizers", default="adam")
  p.add_argument("--warmup-steps", default="0", help="warmup lengths in steps")
  p.add_argument("--base-lr", type=float, default=0.0,
                 help="LR at --reference-batch (default: the config's optim.learning_rate)")
  p.add_argument("--reference-batch", type=int, default=0,
                 help="batch of the base LR (default: the config's optim.reference_batch)")
  p.add_argument("--budget-examples", type=int, default=2000, help="FOVs per run")
  p.add_argument("--budget-seconds", type=float, default=0.0,
                 help="wall-clock seconds per run instead of an example budget")
  p.add_argument("--f1-target", type=float, default=0.5)
  p.add_argument("--f1-smooth", type=int, default=3,
                 help="time-to-F1 uses the running mean of this many logged windows' F1")
  p.add_argument("--log-points", type=int, default=25, help="logged windows per run (about)")
  p.add_argument("--val-fovs", type=int, default=64)
  p.add_argument("--val-seed", type=int, default=1000, help="synthetic held-out volume seed")
  p.add_argument("--val-fraction", type=float, default=0.3,
                 help="real data: held-out share of the training box along y")
  p.add_argument("--no-eval-vi", dest="eval_vi", action="store_false",
                 help="skip the held-out segmentation (flood-fill + VI) after each run")
  p.add_argument("--out", default=os.path.join(_common.REPO, "runs", "lr_batch_study"))
  p.add_argument("--replot", default="",
                 help="comma-separated output folders of earlier studies: merge their "
                      "results.json into --out (table, plots, JSON) without training")
  args, rest = p.parse_known_args(argv)
  args.overrides = _common.normalize_overrides(rest)
  args.batches = _csv(args.batches, int)
  args.rules = _csv(args.rules)
  args.optimizers = _csv(args.optimizers)
  args.warmup_steps = _csv(args.warmup_steps, int)
  if not (args.batches and args.rules and args.optimizers and args.warmup_steps):
    p.error("--batches, --rules, --optimizers and --warmup-steps need at least one value")
  if min(args.batches) < 1 or args.budget_examples < 1 or args.val_fovs < 1:
    p.error("batches, --budget-examples and --val-fovs must be positive")
  return args


# -- held-out evaluation --------------------------------------------------------------------------
def _is_synthetic(config) -> bool:
  return not config.data.image and not config.data.labels


def split_training_box(config, fraction: float):
  """Real data: shrinks the training box along y; returns the held-out box (start, size)."""
  from ffn_jax.data.volumes import open_volume
  d = config.data
  shape = [int(n) for n in open_volume(d.image).shape]
  start = [int(v) for v in d.box_start_zyx]
  size = ([int(v) for v in d.box_size_zyx] if len(d.box_size_zyx)
          else [n - s for n, s in zip(shape, start)])
  size = [min(n, s_max - s) for n, s_max, s in zip(size, shape, start)]
  held = int(round(size[1] * fraction))
  if held < config.model.fov_size_zyx[1] or size[1] - held < 1:
    raise SystemExit(f"error: --val-fraction {fraction} of the training box (y size {size[1]}) "
                     "leaves no room for a held-out FOV or for training")
  d.box_size_zyx = (size[0], size[1] - held, size[2])
  return (start[0], start[1] + size[1] - held, start[2]), (size[0], held, size[2])


def heldout_fovs(config, n_fovs: int, val_seed: int, val_box=None, sample_seed: int = 0) -> dict:
  """FOVs (image, first-step seed, soft labels; float32 [N, z, y, x, 1]) of held-out data."""
  import numpy as np

  from ffn_jax.data import partitions, synthetic
  from ffn_jax.data.examples import LABEL_OFF, LABEL_ON
  from ffn_jax.data.volumes import open_volume
  from ffn_jax.model import logit
  d = config.data
  if val_box is None:
    image, labels = synthetic.make_volume(d.synthetic_shape_zyx, d.synthetic_objects, val_seed)
  else:
    start, size = val_box
    image = open_volume(d.image).read(start, size)
    labels = open_volume(d.labels).read(start, size)
  image = (image.astype(np.float32) - d.image_mean) / d.image_stddev
  fov = np.asarray(config.model.fov_size_zyx, int)
  coords = partitions.coordinates_by_class(partitions.compute_partitions(
      labels, d.thresholds, d.lom_radius_zyx, d.min_size, tuple(int(f) // 2 for f in fov)))
  if not coords:
    raise SystemExit("error: the held-out region has no sampling coordinates")
  sampler = partitions.BalancedSampler(coords, sample_seed)
  out = {k: np.empty((n_fovs, *fov, 1), np.float32) for k in ("image", "seed", "labels")}
  for i in range(n_fovs):
    centre = sampler.next()
    sl = tuple(slice(c - f // 2, c - f // 2 + f) for c, f in zip(centre, fov))
    out["image"][i, ..., 0] = image[sl]
    out["labels"][i, ..., 0] = np.where(labels[sl] == labels[tuple(centre)], LABEL_ON, LABEL_OFF)
    out["seed"][i, ..., 0] = logit(LABEL_OFF)
    out["seed"][(i, *(fov // 2), 0)] = logit(LABEL_ON)
  return out


def evaluate(params, config, fovs: dict, batch_size: int = 8) -> dict:
  """Mean soft-label loss and P/R/F1 of one forward pass over the held-out FOVs."""
  import jax
  import numpy as np

  from ffn_jax import losses
  from ffn_jax.training.state import build_model
  model = build_model(config)

  @jax.jit
  def score(p, image, seed, labels):
    logits = model.apply({"params": p}, image, seed)
    return jax.vmap(losses.sigmoid_xent)(logits, labels), losses.confusion_counts(logits, labels)

  n = len(fovs["image"])
  loss_sum, counts = 0.0, {"tp": 0.0, "fp": 0.0, "fn": 0.0}
  for i in range(0, n, batch_size):  # at most two batch shapes: full and the tail
    per_fov, c = score(params, *(fovs[k][i:i + batch_size] for k in ("image", "seed", "labels")))
    loss_sum += float(np.sum(np.asarray(per_fov)))
    for k in counts:
      counts[k] += float(c[k])
  precision, recall, f1 = losses.precision_recall_f1(counts["tp"], counts["fp"], counts["fn"])
  return {"val_loss": loss_sum / n, "val_precision": precision, "val_recall": recall,
          "val_f1": f1}


def segment_heldout(params, config, val_seed: int, val_box=None) -> dict:
  """Held-out segmentation VI: the final parameters flood the held-out data with the training
  loop's segmentation eval (infer.py's code, ``config.eval``'s flood settings)."""
  from ffn_jax import parallel
  from ffn_jax.training import seg_eval, state
  config = config.copy_and_resolve_references()
  e = config.eval
  if val_box is None:
    e.image, e.labels, e.synthetic_seed = "", "", val_seed
  else:
    e.image, e.labels = config.data.image, config.data.labels
    e.box_start_zyx, e.box_size_zyx = val_box
  scores = seg_eval.SegmentationEval(config, parallel.Dist(),
                                     state.model_meta(config)["model"])(params)
  return {"val_vi": scores["vi"], "val_vi_split": scores["vi_split"],
          "val_vi_merge": scores["vi_merge"], "val_are": scores["are"],
          "val_segments": scores["segments"], "val_eval_s": scores["eval_s"]}


def final_params(workdir: str):
  """The parameters of the latest checkpoint of a training workdir."""
  from ffn_jax import checkpoint
  return checkpoint.load_params(workdir)[0]


# -- one run --------------------------------------------------------------------------------------
@contextlib.contextmanager
def training_time_budget(seconds: float, metrics_path: str):
  """Sends this process SIGTERM once the logged training time exceeds ``seconds``.

  The training time is the sum of the logged windows (the loop's own clock, first step's
  compilation included, setup excluded), so every run gets the same time to train. On SIGTERM
  the loop saves a checkpoint and raises ``Preempted``.
  """
  fired = {"budget": False}
  if seconds <= 0:
    yield fired
    return
  stop = threading.Event()

  def watch():
    while not stop.wait(0.2):
      try:
        records = _common.read_metrics(os.path.dirname(metrics_path))
      except (OSError, ValueError):
        continue
      if sum(_common.window_wall_s(r) for r in _common.step_records(records)) >= seconds:
        fired["budget"] = True
        os.kill(os.getpid(), signal.SIGTERM)
        return

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  try:
    yield fired
  finally:
    stop.set()
    thread.join()


def _first_hit(f1s: list[float], target: float, smooth: int) -> int | None:
  """Index of the first window whose running mean over ``smooth`` windows is >= target."""
  k = max(smooth, 1)
  for i in range(k - 1, len(f1s)):
    if sum(f1s[i - k + 1:i + 1]) / k >= target:
      return i
  return None


def time_to_f1(records: list[dict], target: float, smooth: int = 1) -> dict:
  """First logged window whose F1 (running mean over ``smooth`` windows, as training F1 of one
  window is noisy) is >= target: its step, examples and cumulative loop seconds."""
  windows = _common.step_records(records)
  hit = _first_hit([r["f1"] for r in windows], target, smooth)
  if hit is None:
    return {"steps_to_f1": None, "examples_to_f1": None, "seconds_to_f1": None}
  r = windows[hit]
  return {"steps_to_f1": r["step"], "examples_to_f1": r["step"] * r["global_batch"],
          "seconds_to_f1": sum(_common.window_wall_s(w) for w in windows[:hit + 1])}


def run_one(args, base_config, name: str, optimizer: str, rule: str, warmup: int, batch: int,
            val_fovs: dict, val_box=None) -> dict:
  from ffn_jax import checkpoint, optim
  from ffn_jax.training import loop
  config = base_config.copy_and_resolve_references()
  o = config.optim
  o.name, o.lr_scaling, o.warmup_steps = optimizer, rule, warmup
  if args.base_lr > 0:
    o.learning_rate = args.base_lr
  if args.reference_batch > 0:
    o.reference_batch = args.reference_batch
  config.batch_size = batch
  if "global_batch" in config:  # newer configs: > 0 would override batch_size
    config.global_batch = 0
  if args.budget_seconds > 0:
    config.max_steps = 10**9
    config.log_every = 5  # the budget is checked at logged windows
  else:
    config.max_steps = max(1, math.ceil(args.budget_examples / batch))
    config.log_every = max(1, config.max_steps // max(args.log_points, 1))
  config.checkpoint_every = 10**9
  config.keep_checkpoints = 1
  config.sync_check_every = 0
  config.eval.every_steps, config.eval.every_s = 0, 0.0  # held-out VI is scored after the run
  workdir = _common.fresh_workdir(os.path.join(args.out, "runs", name))
  row = {"name": name, "optimizer": optimizer, "rule": rule, "warmup_steps": warmup,
         "global_batch": batch, "base_lr": o.learning_rate, "reference_batch": o.reference_batch,
         "lr": optim.scaled_learning_rate(o.learning_rate, batch, o.reference_batch, rule),
         "status": "ok"}
  t0 = time.perf_counter()
  with open(os.path.join(workdir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
    try:
      with training_time_budget(args.budget_seconds,
                                os.path.join(workdir, "metrics.jsonl")) as fired:
        loop.train_and_evaluate(config, workdir)
    except loop.Preempted:
      if not fired["budget"]:  # a SIGTERM from outside: stop the whole study
        raise SystemExit(f"stopped by SIGTERM during run {name} (its checkpoint is saved)")
      row["status"] = "ok (time budget)"
    except loop.TrainingDiverged as e:
      row["status"] = f"diverged: {e}"
  row["wall_s"] = time.perf_counter() - t0
  records = _common.read_metrics(workdir) if os.path.exists(
      os.path.join(workdir, "metrics.jsonl")) else []
  steps = _common.step_records(records)
  row["steps"] = steps[-1]["step"] if steps else 0
  row["examples"] = row["steps"] * batch
  row.update(time_to_f1(records, args.f1_target, args.f1_smooth))
  row["train_loss"] = steps[-1]["loss"] if steps else None
  row["train_f1"] = steps[-1]["f1"] if steps else None
  row["curve"] = [{"step": r["step"], "examples": r["step"] * batch, "loss": r["loss"],
                   "f1": r["f1"], "lr": r["learning_rate"]} for r in steps]
  if row["status"].startswith("ok") and not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    row["status"] = "no checkpoint"
  if row["status"].startswith("ok"):
    params = final_params(workdir)
    row.update(evaluate(params, config, val_fovs))
    if args.eval_vi:
      row.update(segment_heldout(params, config, args.val_seed, val_box))
  else:
    row.update(val_loss=None, val_precision=None, val_recall=None, val_f1=None)
  for key in ("val_vi", "val_vi_split", "val_vi_merge", "val_are"):
    row.setdefault(key, None)
  return row


# -- output ---------------------------------------------------------------------------------------
def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def table(rows: list[dict], target: float) -> str:
  head = ("| run | optimizer | rule | warmup | global batch | LR | steps | examples to F1 "
          f">= {target:g} | steps to F1 | s to F1 | train loss | train F1 | val loss | val F1 "
          "| val VI (split / merge) | wall s | status |")
  lines = [head, "|" + "---|" * 17]
  for r in rows:
    lines.append(
        f"| {r['name']} | {r['optimizer']} | {r['rule']} | {r['warmup_steps']} | "
        f"{r['global_batch']} | {r['lr']:.2e} | {r['steps']} | {_fmt(r['examples_to_f1'], 'd')} | "
        f"{_fmt(r['steps_to_f1'], 'd')} | {_fmt(r['seconds_to_f1'], '.0f')} | "
        f"{_fmt(r['train_loss'], '.3f')} | {_fmt(r['train_f1'], '.3f')} | "
        f"{_fmt(r['val_loss'], '.4f')} | {_fmt(r['val_f1'], '.3f')} | "
        f"{_fmt(r.get('val_vi'), '.3f')} ({_fmt(r.get('val_vi_split'), '.2f')} / "
        f"{_fmt(r.get('val_vi_merge'), '.2f')}) | {r['wall_s']:.0f} | "
        f"{r['status'].split(':')[0]} |")
  return "\n".join(lines)


def plot(rows: list[dict], target: float, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = {}
  for r in rows:
    groups.setdefault((r["optimizer"], r["rule"], r["warmup_steps"]), []).append(r)
  colors = dict(zip(sorted({r["rule"] for r in rows}), ("tab:blue", "tab:orange", "tab:green",
                                                        "tab:red", "tab:purple")))
  fig, (ax_v, ax_t) = plt.subplots(1, 2, figsize=(9, 3.4))
  for (opt, rule, warm), rs in sorted(groups.items()):
    rs = sorted(rs, key=lambda r: r["global_batch"])
    label = f"{opt}, {rule}" + (f", warmup {warm}" if warm else "")
    ls = "-" if not warm else "--"
    pts = [(r["global_batch"], r["val_loss"]) for r in rs if r["val_loss"] is not None]
    if pts:
      ax_v.plot(*zip(*pts), ls, marker="o", color=colors[rule], label=label)
    pts = [(r["global_batch"], r["examples_to_f1"]) for r in rs if r["examples_to_f1"]]
    if pts:
      ax_t.plot(*zip(*pts), ls, marker="o", color=colors[rule], label=label)
  ax_v.set(xscale="log", xlabel="global batch", ylabel="held-out loss (end of budget)",
           title="held-out loss")
  ax_t.set(xscale="log", yscale="log", xlabel="global batch", ylabel="training examples",
           title=f"examples to training F1 >= {target:g} (missing: not reached)")
  for ax in (ax_v, ax_t):
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  summary = _common.save_figure(fig, os.path.join(out_dir, "lr_batch_study.png"))
  plt.close(fig)

  fig, (ax_l, ax_f) = plt.subplots(1, 2, figsize=(10, 3.6))
  batches = sorted({r["global_batch"] for r in rows})
  styles = dict(zip(batches, ("-", "--", ":", "-.") * 4))
  for r in rows:
    c = r["curve"]
    if not c:
      continue
    examples = [p["examples"] for p in c]
    style = dict(color=colors[r["rule"]], lw=1 if not r["warmup_steps"] else 1.8,
                 label=f"{r['optimizer']} {r['rule']} w{r['warmup_steps']} b{r['global_batch']}")
    ax_l.plot(examples, [p["loss"] for p in c], styles[r["global_batch"]], **style)
    ax_f.plot(examples, [p["f1"] for p in c], styles[r["global_batch"]], **style)
  ax_f.axhline(target, color="gray", lw=0.8)
  ax_l.set(xlabel="training examples", ylabel="training loss (per logged window)",
           title="training loss", yscale="log")
  ax_f.set(xlabel="training examples", ylabel="training F1 (per logged window)",
           title="training F1 (p >= 0.9)")
  for ax in (ax_l, ax_f):
    ax.grid(alpha=0.3)
  if ax_l.get_legend_handles_labels()[0]:
    ax_l.legend(fontsize=5.5, ncol=2)
  fig.tight_layout()
  curves = _common.save_figure(fig, os.path.join(out_dir, "lr_batch_curves.png"))
  plt.close(fig)
  return [summary, curves]


def write_outputs(args, rows: list[dict], extra: dict) -> dict:
  """Table, plots, results.json in --out; prints the table; returns the result (with curves)."""
  os.makedirs(args.out, exist_ok=True)
  md = table(rows, args.f1_target)
  print(md)
  pngs = plot(rows, args.f1_target, args.out)
  ok = [r for r in rows if r["val_loss"] is not None]
  best = min(ok, key=lambda r: r["val_loss"])["name"] if ok else None
  reached = [r for r in rows if r["examples_to_f1"]]
  fastest = min(reached, key=lambda r: r["steps_to_f1"])["name"] if reached else None
  result = {"benchmark": "lr_batch_study", **extra, "f1_target": args.f1_target,
            "f1_smooth": args.f1_smooth, "best_val_loss_run": best,
            "fewest_steps_to_f1_run": fastest, "loadavg": _common.load_average(),
            "plots": pngs, "table": os.path.join(args.out, "table.md"),
            "json": os.path.join(args.out, "results.json"), "runs": rows}
  result = _common.rounded(result)
  with open(result["table"], "w") as f:
    f.write(md + "\n")
  with open(result["json"], "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {result['table']}, {result['json']}, {', '.join(pngs)}")
  return result


def replot(args) -> dict:
  rows, sources = [], []
  for folder in _csv(args.replot):
    with open(os.path.join(folder, "results.json")) as f:
      earlier = json.load(f)
    same = (earlier.get("f1_target"), earlier.get("f1_smooth")) == (args.f1_target, args.f1_smooth)
    for row in earlier["runs"]:
      if not same:  # recount from the saved curve; its seconds are not saved per window
        hit = _first_hit([p["f1"] for p in row["curve"]], args.f1_target, args.f1_smooth)
        point = row["curve"][hit] if hit is not None else None
        row.update(steps_to_f1=point and point["step"], examples_to_f1=point and point["examples"],
                   seconds_to_f1=None)
      rows.append(row)
    sources.append({k: earlier.get(k) for k in ("config", "overrides", "budget", "heldout")})
  return write_outputs(args, rows, {"replotted_from": _csv(args.replot), "sources": sources})


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.replot:
    result = replot(args)
    result["runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in result["runs"]]
    _common.emit_json(result)
    return 0
  base = _common.load_config(args.config, args.overrides)
  val_box = None if _is_synthetic(base) else split_training_box(base, args.val_fraction)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  val_fovs = heldout_fovs(base, args.val_fovs, args.val_seed, val_box)
  held = (f"synthetic volume seed {args.val_seed}" if val_box is None
          else f"box start {val_box[0]} size {val_box[1]} (training box now "
               f"{tuple(base.data.box_size_zyx)})")
  budget = (f"{args.budget_seconds:g} s" if args.budget_seconds > 0
            else f"{args.budget_examples} examples")
  combos = list(itertools.product(args.optimizers, args.rules, args.warmup_steps, args.batches))
  print(f"{len(combos)} runs of {args.config}, budget {budget} each; held-out: "
        f"{args.val_fovs} FOVs from {held}; load {_common.load_average()}", flush=True)
  rows = []
  for optimizer, rule, warmup, batch in combos:
    name = f"{optimizer}_{rule}_w{warmup}_b{batch}"
    row = run_one(args, base, name, optimizer, rule, warmup, batch, val_fovs, val_box)
    rows.append(row)
    print(f"  {name}: lr {row['lr']:.2e}, {row['steps']} steps, examples to F1 "
          f"{_fmt(row['examples_to_f1'], 'd')}, val loss {_fmt(row['val_loss'], '.4f')}, "
          f"val VI {_fmt(row['val_vi'], '.3f')}, "
          f"{row['wall_s']:.0f} s, {row['status'].split(':')[0]}", flush=True)
  result = write_outputs(args, rows, {
      "config": args.config, "overrides": args.overrides, "budget": budget, "heldout": held,
      "val_fovs": args.val_fovs, "wall_s": time.perf_counter() - t0})
  result["runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in result["runs"]]
  _common.emit_json(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
