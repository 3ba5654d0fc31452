"""Flood settings calibrated for a trained model on validation data, stored with its checkpoint.

A model trained from scratch is rarely best served by the thresholds Google chose for its own
model. ``search`` floods a validation box (labelled data held out from training; never a test
volume) once per setting of a small grid and scores each segmentation's VI against the labels:
first ``move_threshold`` x ``segment_threshold`` at the configured ``min_segment_size``, then
``min_segment_size`` at the best pair (a coordinate search: each setting is a whole flood).

``store`` writes the winner into the training workdir's ``calibration.json``, keyed by checkpoint
kind and step (a later checkpoint is not served a stale calibration); ``InferenceJob.open``
(``infer.py``) applies it when ``calibration=auto`` (the default), except for the keys the
command line sets. Calibrate with ``python -m ffn_jax.calibrate`` or at the end of training
(``eval.calibrate``, on the eval box).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ffn_jax import evaluation
from ffn_jax.errors import UserError

KEYS = ("move_threshold", "segment_threshold", "min_segment_size")
FILE = "calibration.json"
DEFAULT_GRID = {"move_threshold": (0.8, 0.9), "segment_threshold": (0.5, 0.6, 0.7, 0.8),
                "min_segment_size": (0.5, 2.0, 4.0)}  # sizes: multiples of the configured one


def grid_settings(grid: dict, min_size: int) -> tuple[list[dict], list[int]]:
  """(the first stage's (move, segment) settings, the second stage's minimum sizes)."""
  pairs = [{"move_threshold": float(m), "segment_threshold": float(s)}
           for m in grid["move_threshold"] for s in grid["segment_threshold"]]
  for p in pairs:
    for k, v in p.items():
      if not 0.0 < v < 1.0:
        raise UserError(f"calibration grid: {k} must be a probability in (0, 1), got {v}")
  sizes = sorted({max(1, int(round(f * min_size))) for f in grid["min_segment_size"]} - {min_size})
  return pairs, sizes


def search(flood, labels: np.ndarray, base: dict, grid: dict | None = None, log=None):
  """The best flood settings for ``labels`` by VI: (best settings, rows of every try).

  Args:
    flood: ``flood(settings) -> segmentation`` of the validation box with ``base`` updated by
      ``settings`` (``move_threshold``, ``segment_threshold``, ``min_segment_size``).
    labels: the box's truth (0 = unlabelled, ignored).
    base: the configured values of ``KEYS``.
    grid: per key the values to try (``DEFAULT_GRID``; sizes as multiples of ``base``'s).
  """
  grid = {**DEFAULT_GRID, **(grid or {})}
  pairs, sizes = grid_settings(grid, int(base["min_segment_size"]))
  rows = []

  def score(settings):
    t0 = time.perf_counter()
    seg = flood(settings)
    m = evaluation.evaluate_segmentation(seg, labels)
    row = {**settings, "vi": m["vi"], "vi_split": m["vi_split"], "vi_merge": m["vi_merge"],
           "are": m["are"], "fraction_labelled": m["fraction_labelled"],
           "seconds": time.perf_counter() - t0}
    rows.append(row)
    if log is not None:
      log(f"calibration: move {row['move_threshold']} segment {row['segment_threshold']} "
          f"min size {row['min_segment_size']}: VI {row['vi']:.3f} (split {row['vi_split']:.3f}"
          f", merge {row['vi_merge']:.3f}), {row['seconds']:.0f} s")
    return row

  base = {k: base[k] for k in KEYS}
  first = [score({**base, **p}) for p in pairs]
  best = min(first, key=lambda r: r["vi"])
  second = [score({**{k: best[k] for k in KEYS}, "min_segment_size": s}) for s in sizes]
  best = min(first + second, key=lambda r: r["vi"])
  return {k: best[k] for k in KEYS}, rows


def root(checkpoint: str) -> str:
  """The folder whose ``calibration.json`` serves ``checkpoint`` (a training workdir, its
  ``checkpoints`` or ``best`` folder, or a params-only checkpoint folder)."""
  path = os.path.abspath(checkpoint)
  return os.path.dirname(path) if os.path.basename(path) in ("checkpoints", "best") else path


def _key(kind: str, step: int) -> str:
  return f"{kind}:{int(step)}"


def store(checkpoint: str, kind: str, step: int, settings: dict, record: dict) -> str:
  """Adds ``settings`` (and the search's ``record``) for checkpoint ``kind`` ``step``."""
  path = os.path.join(root(checkpoint), FILE)
  table = {}
  if os.path.exists(path):
    with open(path) as f:
      table = json.load(f)
  table[_key(kind, step)] = {"inference": {k: settings[k] for k in KEYS}, **record}
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


def load(checkpoint: str, kind: str, step: int) -> dict | None:
  """The calibrated ``KEYS`` for checkpoint ``kind`` ``step``, or None."""
  path = os.path.join(root(checkpoint), FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      entry = json.load(f).get(_key(kind, step))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} ({e}); delete it or set --config.calibration=off") \
        from None
  return None if entry is None else {k: entry["inference"][k] for k in KEYS}


def apply(config, settings: dict, explicit=()):
  """A copy of the inference ``config`` with ``settings`` in ``config.inference``, except the
  keys in ``explicit`` (``inference.KEY`` paths the command line set); (copy, applied keys)."""
  c = config.copy_and_resolve_references()
  applied = {k: v for k, v in settings.items() if f"inference.{k}" not in set(explicit)}
  c.unlock()
  for k, v in applied.items():
    c.inference[k] = type(c.inference[k])(v)
  c.lock()
  return c, applied
