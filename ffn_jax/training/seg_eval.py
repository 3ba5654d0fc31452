"""Segmentation validation during training: flood-fill a held-out volume with the current
parameters, exactly as ``infer.py`` does, and score it against its labels.

``SegmentationEval(config, dist)`` reads ``config.eval``'s image/labels box once, computes its
seeds once (they depend on the image only) and builds one jitted predictor that is compiled on
the first evaluation and reused with new parameters after that. ``__call__(params)`` runs
on the rank ``eval.rank`` (every rank holds the same parameters, so the result does not depend
on which one floods); the others wait without spinning a core and receive the record.

Besides VI and adapted Rand error the record holds the skeleton scores of
``ffn_jax.skeleton_metrics`` (``erl``, ``erl_max``, ``merges``, ``splits``, ``omitted``, ...):
the eval labels are skeletonized once, on the flooding rank (``ffn_jax.skeletons``, cached on
disk), with lengths in units of ``eval.voxel_size_zyx`` (voxels by default).

The flood settings are ``config.eval``'s own copy of infer.py's (``inference.*``, seed policy,
batch size: ``configs/fib25_infer.add_flood_settings``) and the code is infer.py's: an
``inference.job.InferenceJob`` over the eval box, whose ``segment`` floods it in memory.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ffn_jax import calibration, evaluation, skeleton_metrics, skeletons
from ffn_jax import conv as conv_lib
from ffn_jax.data import synthetic, volumes
from ffn_jax.errors import UserError
from ffn_jax.inference import job as job_lib
from ffn_jax.training.data import read_labelled_box


# The skeleton scores an eval record carries (ffn_jax.skeleton_metrics).
SKELETON_KEYS = ("erl", "erl_voxels", "erl_max", "skeleton_length", "merges", "splits",
                 "omitted")


def enabled(config) -> bool:
  e = config.get("eval")
  return e is not None and (int(e.every_steps) > 0 or float(e.every_s) > 0)


def load_eval_volumes(config) -> tuple[np.ndarray, np.ndarray, float, float]:
  """(raw image, labels, image mean, image sd) of the eval box: ``eval.image``/``eval.labels``,
  or a synthetic volume like the training one's with ``eval.synthetic_seed``."""
  e, d = config.eval, config.data
  if not e.image and not e.labels:
    image, labels = synthetic.make_volume(d.synthetic_shape_zyx, d.synthetic_objects,
                                          int(e.synthetic_seed))
  else:
    image, labels = read_labelled_box(e.image, e.labels, e.box_start_zyx, e.box_size_zyx, "eval")
  fov = np.asarray(config.model.fov_size_zyx)
  if np.any(np.asarray(labels.shape) < fov):
    raise UserError(f"eval box of shape {labels.shape} is smaller than one FOV "
                    f"{tuple(fov.tolist())} (zyx)")
  mean = float(e.image_mean) if e.image_mean > 0 else float(d.image_mean)
  sd = float(e.image_stddev) if e.image_stddev > 0 else float(d.image_stddev)
  return image, labels, mean, sd


class SegmentationEval:
  """Floods the eval box with given parameters; see the module docstring.

  Args:
    config: the training config (``eval``, ``model``, ``data`` sections).
    dist: ``parallel.Dist``.
    model: checkpoint-style model geometry (``depth``, ``features``, ``fov_size_zyx``,
      ``deltas_zyx``).
    heartbeat: called while flooding or waiting (the loop's watchdog: an eval is progress).
  """

  def __init__(self, config, dist, model: dict, heartbeat: Callable[[], None] = lambda: None):
    self.cfg = config.eval
    self.dist = dist
    self.heartbeat = heartbeat
    self.root = int(self.cfg.rank)
    if not 0 <= self.root < dist.size:
      raise UserError(f"eval.rank={self.root} is not a rank of this job (0..{dist.size - 1})")
    route = conv_lib.choose(
        self.cfg.conv_impl or config.model.conv_impl,
        self.cfg.get("compute_dtype", "") or config.model.get("compute_dtype", "auto"), "eval")
    self.voxel_size_zyx = tuple(self.cfg.get("voxel_size_zyx", (1.0, 1.0, 1.0)))
    self.min_nodes = int(self.cfg.get("skeleton_min_nodes", skeleton_metrics.DEFAULT_MIN_NODES))
    self.job = None
    if dist.rank != self.root:
      job_lib.InferenceJob(self.cfg, None, model, None, 0.0, 1.0, route)  # checks the settings
      return
    image, self.labels, mean, sd = load_eval_volumes(config)
    self.job = job_lib.InferenceJob(self.cfg, None, model, volumes.open_volume(image), mean, sd,
                                    route, "eval")
    self.bbox = ((0, 0, 0), tuple(self.labels.shape))
    self.seeds = self.job.seeds(self.bbox)  # they depend on the image only
    self.skeletons, _ = skeletons.load_or_skeletonize(
        self.labels, skeletons.SkeletonParams(voxel_size_zyx=self.voxel_size_zyx))
    if self.cfg.get("best_metric", "vi") == "erl" and self.cfg.keep_best and not any(
        len(s.edges) for s in self.skeletons):
      raise UserError("eval.best_metric=erl needs skeletons, but no eval label has one (each "
                      f"has fewer than {skeletons.SkeletonParams.dust_voxels} voxels)")

  def calibrate(self, params, log=None) -> tuple[dict, list[dict]]:
    """(best flood settings, every try) for ``params`` on the eval box (``calibration.search``),
    on every rank; the eval's own settings are restored afterwards."""
    result = None
    if self.dist.rank == self.root:
      base = {k: self.cfg.inference[k] for k in calibration.KEYS}
      self.job.set_params(params)

      def flood(values):
        self.job.set_flood(**values)
        return self.job.segment(self.bbox, seeds_zyx=self.seeds,
                                heartbeat=self.heartbeat).segmentation

      try:
        result = calibration.search(flood, self.labels, base, log=log)
      finally:
        self.job.set_flood(**base)
    return self.dist.bcast(result, root=self.root, heartbeat=self.heartbeat)

  def __call__(self, params) -> dict:
    """The scores of ``params`` (and the seconds it took, ``eval_s``), on every rank."""
    t0 = time.perf_counter()
    record = None
    if self.dist.rank == self.root:
      self.job.set_params(params)
      result = self.job.segment(self.bbox, seeds_zyx=self.seeds, heartbeat=self.heartbeat)
      seg, counters = result.segmentation, result.counters
      m = evaluation.evaluate_segmentation(seg, self.labels)
      s = skeleton_metrics.evaluate_skeletons(seg, self.skeletons, self.voxel_size_zyx,
                                              self.min_nodes)
      record = {"vi": m["vi"], "vi_split": m["vi_split"], "vi_merge": m["vi_merge"],
                "are": m["are"], "segments": int(counters.get("segments", 0)),
                "fraction_labelled": m["fraction_labelled"],
                "fov_calls": int(counters.get("fov_calls", 0)),
                **{k: s[k] for k in SKELETON_KEYS}}
    record = self.dist.bcast(record, root=self.root, heartbeat=self.heartbeat)
    return {**record, "eval_s": time.perf_counter() - t0}
