"""An inference job, opened once per process, and the one function that segments a block with it.

``InferenceJob.open(config)`` reads the checkpoint (parameters, model geometry, normalization,
trained dtype), opens the image, checks the flood settings and picks the conv route, once; the
jitted predictor is built on first use and compiled once per batch bucket. ``job.segment(bbox,
workdir)`` then segments one block. Every caller goes through it:

- ``infer.py`` on one box (``runner.run``);
- each tile of a tiled run (``tiled.run``: one job per rank, ``segment`` per tile);
- the training loop's segmentation eval, ``training/seg_eval.py``: a job over the eval box with
  the current parameters, ``set_params`` before each evaluation, no workdir.

With a ``workdir`` the block is a resumable job with outputs (``resume``, ``outputs``): its
identity is checked, its state saved every ``checkpoint_interval_s`` and its progress logged
every ``progress_interval_s``; without one it is flooded in memory and returned.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

from ffn_jax import calibration
from ffn_jax import checkpoint as ckpt_lib
from ffn_jax import log as log_lib
from ffn_jax.data import volumes
from ffn_jax.errors import UserError
from ffn_jax.inference import canvas as canvas_lib
from ffn_jax.inference import outputs, padding, progress, resume, settings

_log = log_lib.logger("infer")


class _Stop(Exception):
  """Raised by the debug hook that simulates a kill after N FOV calls."""


@dataclasses.dataclass
class BlockResult:
  """``segment``'s result: the block's counters (also ``counters.json`` with a workdir), and its
  segmentation (zyx, 0 = unlabelled) when the block was flooded here, None when a workdir
  already held it finished or the run stopped early."""
  counters: dict
  segmentation: np.ndarray | None = None


def load_checkpoint(config):
  """(params, model geometry, image mean, image sd, trained dtype, step) of
  ``config.checkpoint``."""
  if not config.checkpoint:
    raise UserError("no model checkpoint: pass --config.checkpoint=DIR (an orbax checkpoint, e.g."
                    " from train.py or ffn_jax.import_tf_checkpoint)")
  step = int(config.checkpoint_step) if int(config.checkpoint_step) >= 0 else None
  kind = str(config.get("checkpoint_kind", "latest"))
  if kind not in ckpt_lib.CHECKPOINT_KINDS:
    raise UserError(f"checkpoint_kind must be one of {ckpt_lib.CHECKPOINT_KINDS}, got {kind!r}")
  try:
    params, meta = ckpt_lib.load_params(config.checkpoint, step, kind)
  except ckpt_lib.CheckpointError as e:
    raise UserError(str(e)) from None
  model = meta.get("model")
  if not model:
    raise UserError(f"checkpoint {config.checkpoint} has no model metadata (depth, features, "
                    "fov_size_zyx, deltas_zyx)")
  fov = tuple(int(v) for v in model["fov_size_zyx"])
  if any(v % 2 == 0 for v in fov):
    raise UserError(f"FOV size {fov} must be odd along every axis")
  mean = float(config.image_mean) if config.image_mean > 0 else meta.get("image_mean")
  sd = float(config.image_stddev) if config.image_stddev > 0 else meta.get("image_stddev")
  if mean is None or sd is None:
    raise UserError("set image_mean and image_stddev (the checkpoint does not record them)")
  return (params, model, float(mean), float(sd), str(meta.get("compute_dtype") or "float32"),
          int(meta.get("checkpoint_step", 0)))


def calibrated(config, step: int, explicit=()):
  """``config`` with the flood settings calibrated for its checkpoint (``ffn_jax.calibration``)
  where ``calibration=auto`` and there are some, except the keys in ``explicit``."""
  mode = str(config.get("calibration", "off"))
  if mode not in ("auto", "off"):
    raise UserError(f"calibration must be 'auto' or 'off', got {mode!r}")
  kind = str(config.get("checkpoint_kind", "latest"))
  settings = calibration.load(config.checkpoint, kind, step) if mode == "auto" else None
  if not settings:
    return config
  config, applied = calibration.apply(config, settings, explicit)
  if applied:
    _log("flood settings calibrated for this checkpoint (" + ", ".join(
        f"{k} {v}" for k, v in applied.items()) + f"; {calibration.FILE}, "
        "--config.calibration=off for the config's)")
  return config


def open_image(config):
  """(Volume, description) of the input image: a volume spec, or a generated synthetic one."""
  if config.image:
    return volumes.open_volume(config.image), str(config.image)
  if "synthetic" in config:
    from ffn_jax.data import synthetic
    s = config.synthetic
    image, _ = synthetic.make_volume(tuple(s.shape_zyx), int(s.objects), int(s.seed))
    return volumes.open_volume(image), f"synthetic{tuple(s.shape_zyx)}/{s.objects}/{s.seed}"
  raise UserError("no input image: set --config.image=SPEC")


class InferenceJob:
  """One model, one image and one set of flood settings, opened once; see the module docstring.

  Args:
    config: the flood settings (``inference.*``, seed policy, ``batch_size``, ``max_pending``,
      ``pad_batches``, ``precision``, ``border_padding``; with workdirs also ``checkpoint*``,
      ``mask``, intervals and ``debug``): infer.py's config, or the training config's ``eval``.
    params, model: parameters and checkpoint-style geometry (``depth``, ``features``,
      ``fov_size_zyx``, ``deltas_zyx``).
    source, image_desc: the image volume (raw values) and how the job identity names it.
    mean, sd: its normalization (``volumes.normalize``).
    route: (conv route, compute dtype, why) from ``conv.choose`` (``settings.compute_route``).
    predict_fn: a replacement for the jitted FFN (same call signature): tests.
  """

  def __init__(self, config, params, model: dict, source, mean: float, sd: float, route,
               image_desc: str = "", predict_fn=None):
    self.config = config
    self.options = settings.flood_options(config)  # bad thresholds fail before any slow work
    self.model = model
    self.source, self.image_desc = source, image_desc
    self.mean, self.sd = float(mean), float(sd)
    self.route, self.compute_dtype, self.why = route
    self.params = params
    self._predictor = predict_fn
    self.opened = {"checkpoint_loads": 0, "predictor_builds": 0}
    self._opening = None  # (perf_counter at open, model load s): the first block's wall time

  @classmethod
  def open(cls, config, predict_fn=None, explicit=()) -> "InferenceJob":
    """Reads ``config.checkpoint`` and opens ``config.image`` (once per process); applies the
    checkpoint's calibrated flood settings (``calibrated``) except ``explicit`` keys."""
    t0 = time.perf_counter()
    settings.flood_options(config)
    params, model, mean, sd, trained_dtype, step = load_checkpoint(config)
    config = calibrated(config, step, explicit)
    route = settings.compute_route(config, trained_dtype)
    load_s = time.perf_counter() - t0
    source, desc = open_image(config)
    job = cls(config, params, model, source, mean, sd, route, desc, predict_fn)
    job.opened["checkpoint_loads"] = 1
    job.checkpoint_step = step
    job._opening = (t0, load_s)
    return job

  # -- the model ---------------------------------------------------------------------------------
  @property
  def predictor(self):
    """The jitted batched FFN forward for ``batch_size`` FOVs, built once (compiled on first
    use of each batch bucket)."""
    if self._predictor is None:
      import jax  # only when the model runs

      from ffn_jax.inference.predict import Predictor
      c = self.config
      pad = str(c.pad_batches)
      if pad == "auto":
        pad = "buckets" if jax.default_backend() == "cpu" else "full"
      self._predictor = Predictor(
          self.params, int(self.model["depth"]), int(self.model["features"]),
          self.model["fov_size_zyx"], max(1, int(c.batch_size)), self.route,
          str(c.precision), pad)
      self.opened["predictor_builds"] += 1
    return self._predictor

  def set_flood(self, **inference) -> None:
    """Other ``inference.*`` values for the next blocks (calibration searches)."""
    c = self.config.copy_and_resolve_references()
    c.unlock()
    for k, v in inference.items():
      c.inference[k] = type(c.inference[k])(v)
    c.lock()
    self.options = settings.flood_options(c)
    self.config = c

  def set_params(self, params) -> None:
    """New parameters for the same model (the training eval): the compiled predictor stays."""
    self.params = params
    if self._predictor is not None and hasattr(self._predictor, "set_params"):
      self._predictor.set_params(params)

  # -- the image ---------------------------------------------------------------------------------
  def bbox(self, start_zyx=None, size_zyx=None):
    """(start, size) of ``config.bbox_*`` (or the given values) inside the image, validated."""
    c = self.config
    return settings.resolve_bbox(self.source.shape,
                                 c.bbox_start_zyx if start_zyx is None else start_zyx,
                                 c.bbox_size_zyx if size_zyx is None else size_zyx)

  def border(self, inner_lo=(False,) * 3, inner_hi=(False,) * 3) -> padding.BorderPadding:
    return padding.BorderPadding(self.config, self.model, inner_lo, inner_hi)

  def canvas_inputs(self, border: padding.BorderPadding, bbox, window=None):
    """(raw padded image, normalized float32 image, bool mask or None) of block ``bbox`` on
    its canvas (``border``'s padding around it), or of the part ``window`` of that canvas."""
    raw = border.read(self.source, bbox, window)
    mask = None
    if self.config.get("mask", ""):
      mask = border.read(volumes.open_volume(self.config.mask), bbox, window) != 0
    return raw, volumes.normalize(raw, self.mean, self.sd), mask

  def seeds(self, bbox, block=None, halo: int = 0, keyed: bool = False) -> np.ndarray:
    """The seed policy's positions over the whole block ``bbox``, on the canvas one pass over it
    would use (``border_padding``): int64 [N, 3], volume coordinates (zyx), in the order that
    pass tries them. Tiles given these (``segment(seeds_zyx=...)``) try the single pass's seeds
    in its order; each tile's own policy would place them differently: PolicyPeaks breaks ties
    with noise drawn over the whole canvas, and its edge filter reaches across tile faces.

    ``keyed``: the policy keyed to volume coordinates (``seed`` module docstring) instead of
    Google's noise. ``block`` = (start, size) inside ``bbox``: only the seeds in that block,
    computed (keyed) on the part of the canvas within ``halo`` voxels of it; with a halo that
    covers the policy's reach (its edge filter, the edge distances, the peak spacing) they are
    the block's share of ``seeds(bbox, keyed=True)``, for a fraction of the memory."""
    border = self.border()
    window = None if block is None else seed_window(border, bbox, block, halo)
    origin = np.asarray(bbox[0], np.int64) - border.lo if window is None else window[0]
    _, image, mask = self.canvas_inputs(border, bbox, window)
    keyed = keyed or block is not None
    coords = settings.seed_coords(self.config, image, mask, origin if keyed else None) + origin
    lo = np.asarray(bbox[0], np.int64)
    hi = lo + np.asarray(bbox[1], np.int64)
    if block is not None:
      lo = np.maximum(lo, np.asarray(block[0], np.int64))
      hi = np.minimum(hi, np.add(block[0], block[1]))
    return coords[np.all((coords >= lo) & (coords < hi), axis=1)]

  def identity(self, bbox) -> dict:
    return resume.identity(self.config, self.image_desc, bbox, self.model, self.mean, self.sd,
                           self.compute_dtype)

  # -- the one way to segment a block ------------------------------------------------------------
  def segment(self, bbox, workdir: str | None = None, *, prior: np.ndarray | None = None,
              within=None, seeds_zyx: np.ndarray | None = None, heartbeat=None,
              tile_progress=None) -> BlockResult:
    """Segments block ``bbox`` = (start, size) of the image.

    Args:
      workdir: where the block's job lives (resume state, outputs); None: in memory only.
      prior: labels 1..P of the block's shape to start from and continue before seeding (tiles:
        their neighbours' segments); new segments get IDs above P. A resumed run takes the
        prior saved with its state.
      within: the (start, size) of the job this block is a tile of: faces of the block inside
        it see half a FOV of the neighbouring image (``padding.BorderPadding``), like FOVs of
        one pass.
      seeds_zyx: seed positions in volume coordinates (zyx), in the order to try them, instead
        of the seed policy on this block (tiles: the policy's seeds over the whole job,
        ``seeds``; the training eval: its seeds, computed once); those outside the block are
        dropped.
      heartbeat: called after each batch of FOVs (the training watchdog).
      tile_progress: the job this block is a tile of (``progress.TiledProgress``): its
        progress lines count the whole job's tiles.
    """
    t_start = time.perf_counter()
    opening, self._opening = (self._opening if workdir is not None else None), None
    if opening is not None:  # the first block's wall time includes opening the job
      t_start = opening[0]
    inner_lo = inner_hi = (False,) * 3
    if within is not None:
      inner_lo = tuple(a > w for a, w in zip(bbox[0], within[0]))
      inner_hi = tuple(a + n < w + m for a, n, w, m in zip(*bbox, *within))
    border = self.border(inner_lo, inner_hi)
    c = self.config
    mode, identity, state_path = "fresh", None, None
    if workdir is not None:
      workdir = os.path.abspath(workdir)
      identity = self.identity(bbox)
      if border.inner:
        identity["inner_faces_zyx"] = [[int(v) for v in inner_lo], [int(v) for v in inner_hi]]
      if seeds_zyx is not None:
        identity["seeds"] = "job"
      os.makedirs(workdir, exist_ok=True)
      mode = resume.check_workdir(workdir, identity)
      if mode == "done":
        _log(f"{workdir} already holds the finished segmentation of this job; nothing to do")
        return BlockResult(outputs.read_json(os.path.join(workdir, outputs.COUNTERS)))
      outputs.write_json(os.path.join(workdir, resume.JOB), {"identity": identity,
                                                             "argv": sys.argv})
      state_path = os.path.join(workdir, resume.STATE)
    say = _log if workdir else None

    t0 = time.perf_counter()
    if say is not None:
      say(f"compute: {self.compute_dtype} convolutions, route {self.route} ({self.why})")
    raw, image, mask = self.canvas_inputs(border, bbox)
    timers = {"time_load_s": time.perf_counter() - t0}
    if opening is not None:
      timers["time_model_load_s"] = opening[1]
    if prior is not None and tuple(prior.shape) != tuple(bbox[1]):
      raise ValueError(f"prior labels of shape {prior.shape} != the block's {tuple(bbox[1])}")
    predictor = self.predictor
    canvas = canvas_lib.Canvas(
        image, predictor, max(1, int(c.batch_size)), self.model["fov_size_zyx"],
        self.model["deltas_zyx"], self.options, mask=mask,
        max_pending=int(c.max_pending) or None,
        prior=border.pad(prior, "constant") if mode == "fresh" else None)

    prior_wall = 0.0
    if mode == "resume":
      canvas.load_state(resume.load_state(state_path))
      prior_wall = float(canvas.counters.get("wall_s", 0.0))
      canvas.count("resumed")
      done, total = canvas.progress()
      _log(f"resuming from {state_path}: {done}/{total} seeds resolved, "
           f"{canvas.counters.get('segments', 0)} segments")
    else:
      t0 = time.perf_counter()
      if seeds_zyx is None:
        coords = settings.seed_coords(c, image, mask)
      else:  # volume -> canvas coordinates
        coords = np.asarray(seeds_zyx, np.int64).reshape(-1, 3) - np.asarray(bbox[0]) + border.lo
      coords = border.inside(coords, image.shape)
      canvas.set_seeds(coords)
      timers["time_seed_policy_s"] = time.perf_counter() - t0
      if say is not None and seeds_zyx is None:
        say(f"{c.seed_policy}: {len(coords)} seeds in {timers['time_seed_policy_s']:.1f} s")
      elif say is not None:
        say(f"{c.seed_policy}: {len(coords)} of the job's seeds lie in this block")
    for k, v in timers.items():
      canvas.count(k, v)

    if hasattr(predictor, "compile"):  # a predictor shared by several blocks counts once
      before = getattr(predictor, "compile_s", 0.0)
      canvas.count("time_compile_s", predictor.compile() - before)
    compile0 = getattr(predictor, "compile_s", 0.0)
    padded0 = getattr(predictor, "padded_fovs", 0)
    stop_after = int(c.debug.stop_after_fov_calls) if "debug" in c else -1
    interval = float(c.get("checkpoint_interval_s", -1.0)) if workdir else -1.0
    meter = progress.FloodProgress(canvas, float(c.get("progress_interval_s", 10.0)), say,
                                   prior_wall + time.perf_counter() - t_start, tile_progress)
    last_save = time.perf_counter()

    def on_step(cv) -> None:
      nonlocal last_save
      if heartbeat is not None:
        heartbeat()
      meter.update()
      if interval >= 0 and time.perf_counter() - last_save >= interval:
        t0 = time.perf_counter()
        cv.counters["wall_s"] = meter.wall_s()
        resume.save_state(state_path, cv.state_dict())
        cv.count("time_checkpoint_s", time.perf_counter() - t0)
        last_save = time.perf_counter()
      if 0 <= stop_after <= cv.counters.get("fov_calls", 0):
        raise _Stop()

    try:
      canvas.segment_all(on_step)
    except _Stop:
      _log(f"debug.stop_after_fov_calls={stop_after} reached: stopping as if killed")
      return BlockResult(canvas.counters)
    lazy = getattr(predictor, "compile_s", 0.0) - compile0  # smaller batch buckets' compiles
    canvas.count("time_compile_s", lazy)
    canvas.count("time_predict_s", -lazy)
    canvas.count("padded_fovs", getattr(predictor, "padded_fovs", 0) - padded0)

    t0 = time.perf_counter()
    seg = border.crop(canvas.segmentation)
    counters = dict(canvas.counters)
    if workdir is not None:
      outputs.write_block(workdir, identity, seg, canvas, bbox, border.lo, border.crop(raw),
                          int(c.get("preview_slices", 0)))
    counters["time_write_s"] = time.perf_counter() - t0
    counters.setdefault("segments", 0)
    counters["voxels_labelled"] = int(np.count_nonzero(seg))
    counters.setdefault("fov_calls", 0)
    counters["wall_s"] = meter.wall_s()
    counters["time_host_s"] = counters["wall_s"] - sum(
        v for k, v in counters.items() if k.startswith("time_") and k != "time_host_s")
    counters.update(complete=True, batch_size=max(1, int(c.batch_size)),
                    bbox_start_zyx=list(bbox[0]), bbox_size_zyx=list(bbox[1]),
                    voxels_total=int(seg.size), seeds_total=len(canvas.seeds),
                    **{k: v for k, v in self.opened.items() if not k.startswith("time_")})
    if workdir is not None:
      outputs.write_json(os.path.join(workdir, outputs.COUNTERS), counters)
      if os.path.exists(state_path):
        os.remove(state_path)
      _log(f"done: {counters['segments']} segments, {counters['voxels_labelled']} / {seg.size} "
           f"voxels labelled, {counters['fov_calls']} FOV calls, {counters['wall_s']:.1f} s -> "
           f"{workdir}")
    return BlockResult(counters, seg)


def seed_window(border: padding.BorderPadding, bbox, block, halo: int):
  """(lo, hi) volume zyx: the part of ``bbox``'s canvas (``border``) within ``halo`` voxels of
  ``block`` = (start, size), where ``InferenceJob.seeds(block=, halo=)`` runs the policy."""
  start = np.asarray(bbox[0], np.int64)
  b_lo = np.asarray(block[0], np.int64)
  b_hi = b_lo + np.asarray(block[1], np.int64)
  c_hi = start + np.asarray(bbox[1], np.int64) + border.hi
  return np.maximum(b_lo - int(halo), start - border.lo), np.minimum(b_hi + int(halo), c_hi)
