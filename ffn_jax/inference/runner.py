"""``infer.py``'s library side: segment a volume block with a trained FFN checkpoint.

``run(config, workdir)`` writes into ``workdir``:

- ``segmentation.zarr``: zyx uint32 (uint64 if needed) segment IDs of the block, 0 = unlabelled;
  its ``.zattrs`` record ``offset_zyx`` (the block's start), ``voxel_size_zyx`` and provenance;
- ``counters.json``: fov_calls, wall_s, segments, voxels_labelled, per-stage times, ...;
- ``segments.json``: per segment its seed (global zyx), FOV iterations, size and overlaps;
- ``preview.png``: a few z slices with the segmentation over the image;
- ``job.json``: what was asked (identifies the job; used to allow resuming);
- ``inference_state.npz`` while running: the periodic checkpoint (removed when done).

Resume order: an existing ``inference_state.npz`` of the same job -> continue from it; a finished
same job -> report and leave it; anything else already in ``workdir`` -> refuse (never overwrite a
segmentation from a different job).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from ffn_jax import checkpoint as ckpt_lib
from ffn_jax.data import volumes
from ffn_jax.errors import UserError
from ffn_jax.inference import canvas as canvas_lib
from ffn_jax.inference import options as options_lib
from ffn_jax.inference import padding
from ffn_jax.inference import preview, seed as seed_lib

SEGMENTATION = "segmentation.zarr"
STATE = "inference_state.npz"
JOB = "job.json"
COUNTERS = "counters.json"


class _Stop(Exception):
  """Raised by the debug hook that simulates a kill after N FOV calls."""


def _log(msg: str) -> None:
  print(f"[infer] {msg}", flush=True)


def _fmt_s(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------- inputs
def options_from_config(config) -> options_lib.InferenceOptions:
  """The canvas options; raises UserError for values that are not probabilities etc."""
  o = config.inference
  for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
    if not 0.0 < float(o[name]) < 1.0:
      raise UserError(f"inference.{name} must be a probability in (0, 1), got {o[name]}")
  if len(o.min_boundary_dist_zyx) != 3 or min(o.min_boundary_dist_zyx) < 0:
    raise UserError(f"inference.min_boundary_dist_zyx needs 3 values >= 0, got "
                    f"{o.min_boundary_dist_zyx}")
  if int(config.batch_size) < 1:
    raise UserError(f"batch_size must be >= 1, got {config.batch_size}")
  if config.pad_batches not in ("auto", "buckets", "full"):
    raise UserError(f"pad_batches must be 'auto', 'buckets' or 'full', got "
                    f"{config.pad_batches!r}")
  return options_lib.InferenceOptions(
      init_activation=float(o.init_activation), pad_value=float(o.pad_value),
      move_threshold=float(o.move_threshold), segment_threshold=float(o.segment_threshold),
      min_segment_size=int(o.min_segment_size),
      min_boundary_dist_zyx=tuple(int(v) for v in o.min_boundary_dist_zyx),
      disco_seed_threshold=float(o.disco_seed_threshold))


def make_canvas(config, image: np.ndarray, predictor, model: dict,
                mask: np.ndarray | None = None,
                prior: np.ndarray | None = None) -> canvas_lib.Canvas:
  """A Canvas over ``image`` (normalized float32 zyx) with the flood settings of ``config``
  (``inference.*``, ``batch_size``, ``max_pending``: ``configs/fib25_infer.add_flood_settings``)
  and the FOV geometry of ``model`` (checkpoint meta ``model``); ``prior``: labels to start
  from and continue (``Canvas``)."""
  return canvas_lib.Canvas(
      image, predictor, max(1, int(config.batch_size)), model["fov_size_zyx"],
      model["deltas_zyx"], options_from_config(config), mask=mask,
      max_pending=int(config.max_pending) or None, prior=prior)


def seed_coords(config, image: np.ndarray, mask: np.ndarray | None = None,
                origin_zyx=None) -> np.ndarray:
  """The seed positions of ``config``'s seed policy (``seed_policy``, ``seed_min_distance``,
  ``grid_step``, ``grid_offsets``, ``voxel_size_zyx``) on a normalized image; ``origin_zyx``
  (the image's volume position): keyed to volume coordinates (``seed`` module docstring)."""
  return seed_lib.make_seed_coords(
      str(config.seed_policy), image, mask, tuple(config.voxel_size_zyx),
      int(config.seed_min_distance), int(config.grid_step), tuple(config.grid_offsets),
      origin_zyx)


def canvas_inputs(config, border: padding.BorderPadding, source, bbox, mean: float, sd: float,
                  window=None):
  """(raw padded image, normalized float32 image, bool mask or None) of block ``bbox`` on its
  canvas (``border``'s padding around it), or of the part ``window`` of that canvas."""
  padded = border.read(source, bbox, window)
  image = (padded.astype(np.float32) - np.float32(mean)) / np.float32(sd)
  mask = None
  if config.mask:
    mask = border.read(volumes.open_volume(config.mask), bbox, window) != 0
  return padded, image, mask


def job_seeds(config, model: dict, source, bbox, mean: float, sd: float, block=None,
              halo: int = 0, keyed: bool = False) -> np.ndarray:
  """The seed policy's positions over the whole block ``bbox``, on the canvas one pass over it
  would use (``border_padding``): int64 [N, 3], volume coordinates (zyx), in the order that pass
  tries them. Tiles given these (``run(seeds_zyx=...)``) try the single pass's seeds in its
  order; each tile's own policy would place them differently: PolicyPeaks breaks ties with noise
  drawn over the whole canvas, and its edge filter reaches across tile faces.

  ``keyed``: the policy keyed to volume coordinates (``seed`` module docstring) instead of
  Google's noise. ``block`` = (start, size) inside ``bbox``: only the seeds in that block,
  computed (keyed) on the part of the canvas within ``halo`` voxels of it; with a halo that
  covers the policy's reach (its edge filter, the edge distances, the peak spacing) they are
  the block's share of ``job_seeds(..., keyed=True)``, for a fraction of the memory."""
  border = padding.BorderPadding(config, model)
  window = None if block is None else seed_window(border, bbox, block, halo)
  origin = np.asarray(bbox[0], np.int64) - border.lo if window is None else window[0]
  _, image, mask = canvas_inputs(config, border, source, bbox, mean, sd, window)
  keyed = keyed or block is not None
  coords = seed_coords(config, image, mask, origin if keyed else None) + origin  # volume zyx
  lo = np.asarray(bbox[0], np.int64)
  hi = lo + np.asarray(bbox[1], np.int64)
  if block is not None:
    lo = np.maximum(lo, np.asarray(block[0], np.int64))
    hi = np.minimum(hi, np.add(block[0], block[1]))
  return coords[np.all((coords >= lo) & (coords < hi), axis=1)]


def seed_window(border: padding.BorderPadding, bbox, block, halo: int):
  """(lo, hi) volume zyx: the part of ``bbox``'s canvas (``border``) within ``halo`` voxels of
  ``block`` = (start, size), where ``job_seeds(block=, halo=)`` runs the seed policy."""
  start = np.asarray(bbox[0], np.int64)
  b_lo = np.asarray(block[0], np.int64)
  b_hi = b_lo + np.asarray(block[1], np.int64)
  c_hi = start + np.asarray(bbox[1], np.int64) + border.hi
  return np.maximum(b_lo - int(halo), start - border.lo), np.minimum(b_hi + int(halo), c_hi)


def make_predictor(config, params, model: dict, conv_impl: str):
  """The jitted batched FFN forward for ``config.batch_size`` FOVs (compiled on first use)."""
  import jax  # only when the model runs

  from ffn_jax.inference.predict import Predictor
  pad = str(config.pad_batches)
  if pad == "auto":
    pad = "buckets" if jax.default_backend() == "cpu" else "full"
  return Predictor(params, int(model["depth"]), int(model["features"]), model["fov_size_zyx"],
                   max(1, int(config.batch_size)), conv_impl, str(config.precision), pad)


def resolve_bbox(volume_shape, start_zyx, size_zyx):
  """Validated (start, size) inside the volume; size entries <= 0 run to the volume's end."""
  start = tuple(int(v) for v in start_zyx) if len(start_zyx) else (0, 0, 0)
  size = tuple(int(v) for v in size_zyx) if len(size_zyx) else (0, 0, 0)
  if len(start) != 3 or len(size) != 3:
    raise UserError(f"bbox_start_zyx and bbox_size_zyx need 3 values (z, y, x); got {start_zyx} "
                    f"and {size_zyx}")
  size = tuple(s if s > 0 else d - a for s, a, d in zip(size, start, volume_shape))
  if any(a < 0 for a in start) or any(s <= 0 for s in size) or any(
      a + s > d for a, s, d in zip(start, size, volume_shape)):
    raise UserError(f"bounding box start {start} size {size} (zyx) lies outside the volume of "
                    f"shape {tuple(volume_shape)}")
  return start, size


def load_model(config):
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
  return params, model, float(mean), float(sd), str(meta.get("compute_dtype") or "float32")


def compute_route(config, trained_dtype: str = "float32") -> tuple[str, str, str]:
  """(conv route, compute dtype, why) for inference: ``compute_dtype``, or when it is '' the
  dtype the checkpoint was trained with (``trained_dtype``)."""
  from ffn_jax import conv as conv_lib  # jax import only when the model runs
  dtype = str(config.get("compute_dtype", "")) or trained_dtype
  why = "" if config.get("compute_dtype", "") else f" (the checkpoint's: {trained_dtype})"
  try:
    route, dtype, reason = conv_lib.select(str(config.conv_impl), dtype)
  except ValueError as e:
    raise UserError(str(e)) from None
  return route, dtype, reason + why


def load_image(config):
  """(Volume, description) of the input image: a volume spec, or a generated synthetic one."""
  if config.image:
    return volumes.open_volume(config.image), str(config.image)
  if "synthetic" in config:
    from ffn_jax.data import synthetic
    s = config.synthetic
    image, _ = synthetic.make_volume(tuple(s.shape_zyx), int(s.objects), int(s.seed))
    return volumes.open_volume(image), f"synthetic{tuple(s.shape_zyx)}/{s.objects}/{s.seed}"
  raise UserError("no input image: set --config.image=SPEC")


def job_identity(config, image_desc: str, bbox, model, mean, sd, compute_dtype: str) -> dict:
  """What determines the segmentation (batch size, intervals etc. do not)."""
  return {
      "image": image_desc,
      "bbox_start_zyx": list(bbox[0]), "bbox_size_zyx": list(bbox[1]),
      "mask": str(config.mask),
      "checkpoint": os.path.abspath(config.checkpoint),
      "checkpoint_step": int(config.checkpoint_step),
      "checkpoint_kind": str(config.get("checkpoint_kind", "latest")),
      "model": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in model.items()},
      "image_mean": mean, "image_stddev": sd, "compute_dtype": compute_dtype,
      "inference": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in config.inference.to_dict().items()},
      "seed_policy": str(config.seed_policy), "seed_min_distance": int(config.seed_min_distance),
      "grid_step": int(config.grid_step), "grid_offsets": list(config.grid_offsets),
      "voxel_size_zyx": [float(v) for v in config.voxel_size_zyx],
      "border_padding": str(config.get("border_padding", "none")),
  }


def segmentation_attrs(identity: dict) -> dict:
  """What ``segmentation.zarr`` records about itself (its ``.zattrs``).

  ``offset_zyx``: where its voxel (0, 0, 0) sits in the source image, so that
  ``ffn_jax.evaluate`` crops the truth to match; ``voxel_size_zyx``; and provenance: the job
  identity (image, checkpoint, model, normalization, inference settings) and the version.
  """
  import ffn_jax
  return {"offset_zyx": list(identity["bbox_start_zyx"]),
          "voxel_size_zyx": list(identity["voxel_size_zyx"]),
          "ffn_jax": {"version": ffn_jax.__version__, "job": identity}}


def _check_workdir(workdir: str, identity: dict):
  """Returns 'fresh', 'resume' or 'done'; raises if workdir holds another job's results."""
  job_path = os.path.join(workdir, JOB)
  has_job = os.path.exists(job_path)
  same = has_job and _read_json(job_path).get("identity") == identity
  has_seg = os.path.exists(os.path.join(workdir, SEGMENTATION))
  has_state = os.path.exists(os.path.join(workdir, STATE))
  if (has_seg or has_state) and not same:
    raise UserError(f"{workdir} already holds a segmentation or inference state of a different "
                    "job; use another --workdir (or delete it)")
  if has_state:
    return "resume"
  if has_seg and finished(workdir):
    return "done"
  return "fresh"


def finished(workdir: str) -> bool:
  """Whether ``workdir`` holds a finished run (its counters.json says ``complete``)."""
  path = os.path.join(workdir, COUNTERS)
  return os.path.exists(path) and bool(_read_json(path).get("complete"))


def _save_state(path: str, state: dict) -> None:
  tmp = path + ".tmp.npz"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **state)
  os.replace(tmp, path)


def _load_state(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001 - a truncated / foreign file
    raise UserError(f"cannot read inference state {path} ({type(e).__name__}: {e}); delete it "
                    "to start over") from None


# ------------------------------------------------------------------------------------- run
def run(config, workdir: str, predict_fn=None, prior: np.ndarray | None = None,
        within=None, seeds_zyx: np.ndarray | None = None) -> dict:
  """Segments the configured block; returns the counters (also written to counters.json).

  Args:
    predict_fn: a replacement for the jitted FFN (same call signature): tests, and tiles that
      share one predictor.
    prior: labels 1..P of the block's shape to start from and continue before seeding (tiles:
      their neighbours' segments); new segments get IDs above P. A resumed run takes the prior
      saved with its state.
    within: the (start, size) of the job this block is a tile of: faces of the block inside it
      see half a FOV of the neighbouring image (``padding.BorderPadding``), like FOVs of one pass.
    seeds_zyx: seed positions in volume coordinates (zyx), in the order to try them, instead of
      the seed policy on this block (tiles: the policy's seeds over the whole job, ``job_seeds``);
      those outside the block are dropped.
  """
  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  options_from_config(config)  # bad thresholds fail before any slow work
  params, model, mean, sd, trained_dtype = load_model(config)
  route, compute_dtype, why = compute_route(config, trained_dtype)
  t_model = time.perf_counter() - t_start
  source, image_desc = load_image(config)
  bbox = resolve_bbox(source.shape, config.bbox_start_zyx, config.bbox_size_zyx)
  inner_lo = inner_hi = (False,) * 3
  if within is not None:
    inner_lo = tuple(a > w for a, w in zip(bbox[0], within[0]))
    inner_hi = tuple(a + n < w + m for a, n, w, m in zip(*bbox, *within))
  border = padding.BorderPadding(config, model, inner_lo, inner_hi)
  identity = job_identity(config, image_desc, bbox, model, mean, sd, compute_dtype)
  if border.inner:
    identity["inner_faces_zyx"] = [[int(v) for v in inner_lo], [int(v) for v in inner_hi]]
  if seeds_zyx is not None:
    identity["seeds"] = "job"
  os.makedirs(workdir, exist_ok=True)
  mode = _check_workdir(workdir, identity)
  if mode == "done":
    _log(f"{workdir} already holds the finished segmentation of this job; nothing to do")
    return _read_json(os.path.join(workdir, COUNTERS))
  write_json(os.path.join(workdir, JOB), {"identity": identity, "argv": sys.argv})
  timers = {"time_model_load_s": t_model}

  t0 = time.perf_counter()
  padded, image, mask = canvas_inputs(config, border, source, bbox, mean, sd)
  raw = border.crop(padded)
  timers["time_load_s"] = time.perf_counter() - t0

  batch_size = max(1, int(config.batch_size))
  _log(f"compute: {compute_dtype} convolutions, route {route} ({why})")
  predictor = predict_fn or make_predictor(config, params, model, route)
  if prior is not None and tuple(prior.shape) != tuple(bbox[1]):
    raise ValueError(f"prior labels of shape {prior.shape} != the block's {tuple(bbox[1])}")
  canvas = make_canvas(config, image, predictor, model, mask,
                       border.pad(prior, "constant") if mode == "fresh" else None)

  state_path = os.path.join(workdir, STATE)
  prior_wall = 0.0
  if mode == "resume":
    canvas.load_state(_load_state(state_path))
    prior_wall = float(canvas.counters.get("wall_s", 0.0))
    canvas.count("resumed")
    done, total = canvas.progress()
    _log(f"resuming from {state_path}: {done}/{total} seeds resolved, "
         f"{canvas.counters.get('segments', 0)} segments")
  else:
    t0 = time.perf_counter()
    if seeds_zyx is None:
      coords = seed_coords(config, image, mask)
    else:  # volume -> canvas coordinates
      coords = np.asarray(seeds_zyx, np.int64).reshape(-1, 3) - np.asarray(bbox[0]) + border.lo
    coords = border.inside(coords, image.shape)
    canvas.set_seeds(coords)
    timers["time_seed_policy_s"] = time.perf_counter() - t0
    if seeds_zyx is None:
      _log(f"{config.seed_policy}: {len(coords)} seeds in {timers['time_seed_policy_s']:.1f} s")
    else:
      _log(f"{config.seed_policy}: {len(coords)} of the job's seeds lie in this block")
  for k, v in timers.items():
    canvas.count(k, v)

  if hasattr(predictor, "compile"):  # a predictor shared by several runs (tiles) counts once
    before = getattr(predictor, "compile_s", 0.0)
    canvas.count("time_compile_s", predictor.compile() - before)
  compile0 = getattr(predictor, "compile_s", 0.0)
  padded0 = getattr(predictor, "padded_fovs", 0)

  def account_predictor() -> None:
    """Moves compiles of smaller batch buckets from time_predict_s to time_compile_s."""
    lazy = getattr(predictor, "compile_s", 0.0) - compile0
    canvas.count("time_compile_s", lazy)
    canvas.count("time_predict_s", -lazy)
    canvas.count("padded_fovs", getattr(predictor, "padded_fovs", 0) - padded0)

  stop_after = int(config.debug.stop_after_fov_calls)
  interval = float(config.checkpoint_interval_s)
  progress_every = float(config.progress_interval_s)
  t_run = time.perf_counter()
  fov0 = canvas.counters.get("fov_calls", 0)
  frac0 = canvas.progress()[0] / max(canvas.progress()[1], 1)
  marks = {"ckpt": time.perf_counter(), "log": time.perf_counter()}

  def wall() -> float:
    return prior_wall + time.perf_counter() - t_start

  def on_step(c) -> None:
    now = time.perf_counter()
    if interval >= 0 and now - marks["ckpt"] >= interval:
      t0 = time.perf_counter()
      c.counters["wall_s"] = wall()
      _save_state(state_path, c.state_dict())
      c.count("time_checkpoint_s", time.perf_counter() - t0)
      marks["ckpt"] = time.perf_counter()
    if progress_every >= 0 and now - marks["log"] >= progress_every:
      marks["log"] = now
      done, total = c.progress()
      fov = c.counters.get("fov_calls", 0)
      rate = (fov - fov0) / max(now - t_run, 1e-9)
      frac = done / max(total, 1)
      eta = ((now - t_run) / (frac - frac0) * (1 - frac) if frac > frac0 else float("nan"))
      _log(f"seeds {done}/{total} ({100 * frac:.1f}%)  segments {c.counters.get('segments', 0)}"
           f"  fov {fov} ({rate:.2f}/s)  elapsed {_fmt_s(wall())}"
           f"  ETA {_fmt_s(eta) if eta == eta else '?'}")
    if 0 <= stop_after <= c.counters.get("fov_calls", 0):
      raise _Stop()

  try:
    canvas.segment_all(on_step)
  except _Stop:
    _log(f"debug.stop_after_fov_calls={stop_after} reached: stopping as if killed")
    return canvas.counters
  account_predictor()

  t0 = time.perf_counter()
  seg = border.crop(canvas.segmentation)
  out_dtype = np.uint32 if canvas.max_id < 2**32 else np.uint64
  volumes.write_zarr(os.path.join(workdir, SEGMENTATION), seg.astype(out_dtype),
                     attrs=segmentation_attrs(identity))
  segments = {str(sid): {"seed_zyx": [int(a + b - w) for a, b, w in
                                      zip(o[0], bbox[0], border.lo)],
                         "fov_iters": o[1], "voxels": o[2],
                         **({"continued": True} if sid <= canvas.n_prior else {}),
                         "overlaps": {str(int(i)): int(n) for i, n in zip(*canvas.overlaps[sid])}}
              for sid, o in sorted(canvas.origins.items())}
  write_json(os.path.join(workdir, "segments.json"), segments)
  if int(config.preview_slices) > 0:
    preview.write_preview(os.path.join(workdir, "preview.png"), raw, seg,
                          int(config.preview_slices), title=f"bbox {bbox[0]} + {bbox[1]}")
  counters = dict(canvas.counters)
  counters["time_write_s"] = time.perf_counter() - t0
  counters.setdefault("segments", 0)
  counters["voxels_labelled"] = int(np.count_nonzero(seg))
  counters.setdefault("fov_calls", 0)
  counters["wall_s"] = wall()
  counters["time_host_s"] = counters["wall_s"] - sum(
      v for k, v in counters.items() if k.startswith("time_") and k != "time_host_s")
  counters.update(complete=True, batch_size=batch_size, bbox_start_zyx=list(bbox[0]),
                  bbox_size_zyx=list(bbox[1]), voxels_total=int(seg.size),
                  seeds_total=len(canvas.seeds))
  write_json(os.path.join(workdir, COUNTERS), counters)
  if os.path.exists(state_path):
    os.remove(state_path)
  _log(f"done: {counters['segments']} segments, {counters['voxels_labelled']} / {seg.size} voxels "
       f"labelled, {counters['fov_calls']} FOV calls, {counters['wall_s']:.1f} s -> {workdir}")
  return counters
