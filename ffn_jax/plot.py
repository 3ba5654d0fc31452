"""Curves of one or more training runs from their ``metrics.jsonl``, as a PNG.

  python -m ffn_jax.plot WORKDIR [WORKDIR ...] [--out curves.png] [--labels a,b]

Panels: training loss, training F1, segmentation eval VI (solid; split and merge dashed and
dotted), eval expected run length (solid; dashed: the ERL a perfect segmentation reaches) and
training throughput (FOV/s); the top row against steps, the bottom row against
examples seen (steps x global batch), so runs with different batch sizes compare on either
axis. A run with a VI target (``eval.target_vi``) shows it as a grey line in the VI panel and
the eval that first reached it as a star. Several work directories are overlaid, one colour each. Without ``--out`` the figure goes
to ``WORKDIR/curves.png`` of the first run. Bad input prints one ``error:`` line and exits 2.

TensorBoard: training writes the same records as scalars to ``WORKDIR/tensorboard``
(``tensorboard --logdir WORKDIR``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ffn_jax.errors import UserError

PANELS = (("loss", "training loss"), ("f1", "training F1 (p >= 0.9)"),
          ("vi", "eval VI (bits)"), ("erl", "eval ERL"), ("fovs_per_s", "FOV/s"))
EVAL_PANELS = {"vi": ("vi_split", "vi_merge"), "erl": ("erl_max",)}  # key: its extra lines
_EXTRA_STYLES = ("--", ":")
_TITLE_NOTES = {"vi": " (-- split, : merge)", "erl": " (-- perfect)"}


def read_run(workdir: str) -> tuple[list[dict], list[dict]]:
  """(training records, eval records) of a work directory; raises UserError if it has none."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise UserError(f"no metrics.jsonl in {workdir}: not a training work directory")
  train, evals = [], []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        raise UserError(f"{path} line {n} is not JSON") from None
      if record.get("eval"):
        evals.append(record)
      elif not record.get("final") and "loss" in record:
        train.append(record)
  if not train and not evals:
    raise UserError(f"{path} holds no training or eval records yet")
  return train, evals


def _examples(record: dict, batch: int) -> int:
  return record.get("examples", record["step"] * record.get("global_batch", batch))


def plot_runs(workdirs: list[str], out: str, labels: list[str] | None = None) -> str:
  """Writes the curves of ``workdirs`` to ``out`` (PNG); returns ``out``."""
  import matplotlib.pyplot as plt
  fig = draw(workdirs, labels)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=80)
  plt.close(fig)
  return out


def draw(workdirs: list[str], labels: list[str] | None = None):
  """The figure of ``workdirs``' curves: ``axes[row][col]``, rows (steps, examples), columns
  ``PANELS``; one line per run and panel (three in the VI panel: VI, split, merge; two in the
  ERL panel: ERL, ERL of a perfect segmentation). A missing score (an eval record from before
  ERL existed, or None) is a gap."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise UserError(f"{len(labels)} labels for {len(workdirs)} work directories")
  runs = [read_run(w) for w in workdirs]
  targets = [read_target(w) for w in workdirs]
  fig, axes = plt.subplots(2, len(PANELS), figsize=(4.2 * len(PANELS), 6.4), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, ((train, evals), label) in enumerate(zip(runs, labels)):
    color = colors[i % len(colors)]
    batch = train[0]["global_batch"] if train else 1
    for row, xname in enumerate(("step", "examples")):
      x_of = (lambda r: r["step"]) if xname == "step" else (lambda r: _examples(r, batch))
      for col, (key, _) in enumerate(PANELS):
        ax = axes[row][col]
        records = evals if key in EVAL_PANELS else train
        if not records:
          continue
        xs = [x_of(r) for r in records]
        ax.plot(xs, _values(records, key), color=color, label=label,
                marker="o" if key in EVAL_PANELS else None, ms=3)
        for extra, ls in zip(EVAL_PANELS.get(key, ()), _EXTRA_STYLES):
          ax.plot(xs, _values(records, extra), color=color, ls=ls, lw=0.8)
        target = targets[i]
        if key == "vi" and target is not None:
          ax.axhline(target["target_vi"], color="grey", lw=0.8, ls="-.")
          if target.get("step") is not None:
            ax.plot([x_of(target)], [target["vi"]], color=color, marker="*", ms=11)
  for col, (key, title) in enumerate(PANELS):
    for row, xname in enumerate(("steps", "examples seen")):
      ax = axes[row][col]
      ax.set_title(title + _TITLE_NOTES.get(key, ""), fontsize=9)
      ax.set_xlabel(xname, fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def read_target(workdir: str) -> dict | None:
  """The run's time-to-target record (``eval.target_vi``): the first eval at or below the target
  (``step``, ``examples``, ``wall_s``, ``vi``), or ``{"target_vi": T}`` from the final record
  of a run that did not reach it, or None (no target)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  reached = [r for r in records if r.get("target")]
  if reached:
    return reached[0]
  finals = [r for r in records if r.get("final") and r.get("target_vi")]
  return {"target_vi": finals[-1]["target_vi"]} if finals else None


def _values(records: list[dict], key: str) -> list[float]:
  return [float("nan") if r.get(key) is None else r[key] for r in records]


def main(argv: list[str] | None = None) -> None:
  class Parser(argparse.ArgumentParser):
    def error(self, message):
      raise UserError(f"{message} (see --help)")

  p = Parser(prog="python -m ffn_jax.plot", description=__doc__.split("\n\n")[0])
  p.add_argument("workdirs", nargs="+", help="training work directories")
  p.add_argument("--out", default="", help="PNG path (default: FIRST_WORKDIR/curves.png)")
  p.add_argument("--labels", default="", help="comma-separated legend labels, one per run")
  args = p.parse_args(argv)
  out = args.out or os.path.join(args.workdirs[0], "curves.png")
  labels = args.labels.split(",") if args.labels else None
  print(plot_runs(args.workdirs, out, labels))


if __name__ == "__main__":
  from ffn_jax.cli import clean_errors
  with clean_errors():
    main(sys.argv[1:])
