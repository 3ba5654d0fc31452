"""Whole volumes: overlapping tiles spread over MPI ranks, stitched into one segmentation.

``infer.py`` runs this when ``tile_size_zyx`` is set. The bbox is cut into overlapping tiles
(``ffn_jax.inference.tiling``); each tile is one ordinary single-box job (``InferenceJob.segment``: the same
Canvas, settings and results as a box run, its own resume state, finished when its
``counters.json`` says so). Ranks take tiles one at a time by creating a claim file (an atomic
``O_EXCL`` create in a folder of this launch), so a rank that finishes early takes the next
tile: tiles differ greatly in cost. When all tiles are done rank 0 stitches them (rule:
``tiling``'s docstring) and writes the volume core by core.

``tile_mode``:

- ``continue``: two rounds, the tiles of even index sum first, then the others (a
  checkerboard: every face neighbour of a second-round tile is a first-round one). A second-round
  tile starts from its first-round neighbours' segments in their cores (``prior.json`` says
  which) and floods each of them on into itself before it seeds (``Canvas``), so an object
  that crosses a face keeps one ID as if one pass had segmented both tiles; the stitching rule
  joins the rest (tiles that meet only at an edge or a corner, and what continuation missed).
- ``independent`` (default): every tile on its own, all at once, joined by the stitching rule
  alone. On training data it agreed better with a single pass (docs/benchmarks.md section 7).

``tile_context=True``: a tile's faces towards its neighbours get half a FOV of their image
(``padding.BorderPadding``), so its FOVs reach them as one pass's would; without it a tile labels
the half-FOV shell inside each face only with the edges of FOVs further in, and that is where
tiles differed most from one pass (docs/benchmarks.md section 7). ``border_padding`` still
decides the bbox's own outer faces.

``tile_seeds=job`` (``auto`` up to 384³ voxels): rank 0 runs the seed policy once over the whole
bbox, on the canvas one pass would use, and every tile tries the seeds in its block in that
order (``InferenceJob.seeds``). A tile's own PolicyPeaks moves seeds by a voxel or two (its
tie-breaking noise is drawn over the block's shape, its edge filter reaches across the faces),
and FFN's floods depend on exactly where they start. ``tile_seeds=halo`` (``auto`` above 384³):
each tile runs the policy over its block and ``seed_halo`` voxels of the job's canvas around it,
keyed to volume coordinates (its tie-breaking noise a hash of the position), so two tiles place
the same seeds where they overlap, as one keyed pass over the bbox would, and no rank holds the
whole bbox. ``tile``: each tile seeds its own block (every tiled run before 2026-12-06).

``WORKDIR`` holds:

- ``tiling.json``: the job and the tile plan (a rerun of another job is refused);
- ``tiles/<z_y_x>/``: each tile's run (``segmentation.zarr``, ``counters.json``, ...), kept, so
  that ``stitch.*`` can be changed and stitching redone without segmenting again; a tile that
  continued its neighbours' segments also has ``prior.json`` (its local ID k -> [tile, ID]);
- ``seeds.npy``: the job's seeds (volume zyx) with ``tile_seeds=job``;
- ``claims/<launch>/``: which rank took which tile in each launch;
- the stitched volume (``stitch.output``, default ``segmentation.zarr``, or a neuroglancer
  precomputed folder with ``output_format=precomputed``), recording its offset, voxel size and
  provenance; ``segments.json``: global ID -> voxels; ``stitch.json``: thresholds, merges, counts.

A killed job, or a dead rank, loses at most the tiles in flight (each resumes from its own
``inference_state.npz``): rerun the same command.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid

import numpy as np

from ffn_jax import log as log_lib
from ffn_jax.data import volumes
from ffn_jax.errors import UserError
from ffn_jax.inference import job as job_lib
from ffn_jax.inference import outputs, progress, resume, settings, tiling

TILING = "tiling.json"
PRIOR = "prior.json"
TILE_MODES = ("continue", "independent")
TILE_SEEDS = ("auto", "job", "halo", "tile")
SEEDS = "seeds.npy"
# tile_seeds=auto: rank 0 runs the seed policy over bboxes up to this size (384^3: PolicyPeaks
# peaks at ~75 bytes per voxel of the padded bbox, ~4.5 GB here); above, each tile over its
# block and a halo (tile_seeds=halo).
JOB_SEEDS_MAX_VOXELS = 384 ** 3


_log = log_lib.logger("infer")


def enabled(config) -> bool:
  return any(int(v) > 0 for v in config.get("tile_size_zyx", ()))


def _seed_source(config, bbox) -> str:
  """Where the tiles take their seeds (``tile_seeds``): "job", "halo", "tile", or "auto": job up
  to ``JOB_SEEDS_MAX_VOXELS``, halo above."""
  choice = str(config.get("tile_seeds", "tile"))
  if choice not in TILE_SEEDS:
    raise UserError(f"tile_seeds must be one of {TILE_SEEDS}, got {choice!r}")
  if choice == "auto":
    return "job" if math.prod(bbox[1]) <= JOB_SEEDS_MAX_VOXELS else "halo"
  if choice == "halo" and int(config.get("seed_halo", 0)) < 0:
    raise UserError(f"seed_halo must be >= 0 voxels, got {config.seed_halo}")
  return choice


def _stitch_settings(config) -> dict:
  s = config.stitch
  overlaps = tuple(int(o) for o in config.tile_overlap_zyx)
  margin = min(overlaps) // 4 if int(s.margin) == -1 else int(s.margin)
  if margin < 0 or (margin > 0 and 2 * margin >= min(overlaps)):
    raise UserError(f"stitch.margin must be -1 (auto) or >= 0 and below half of the smallest "
                    f"tile_overlap_zyx {overlaps}, got {s.margin} (the tiles are compared in "
                    "the middle of their overlap)")
  if int(s.min_overlap_voxels) < 1:
    raise UserError(f"stitch.min_overlap_voxels must be >= 1, got {s.min_overlap_voxels}")
  if not 0.5 < float(s.min_fraction) <= 1.0:
    raise UserError(f"stitch.min_fraction must lie in (0.5, 1], got {s.min_fraction} (above "
                    "0.5 a segment matches at most one segment of the neighbouring tile)")
  if not 0.5 < float(s.join_fraction) <= 1.0:
    raise UserError(f"stitch.join_fraction must lie in (0.5, 1], got {s.join_fraction}")
  return {"min_overlap_voxels": int(s.min_overlap_voxels), "min_fraction": float(s.min_fraction),
          "margin": margin, "join_fraction": float(s.join_fraction)}


def _check_continuation_overlap(tiles, fov_zyx, overlap_zyx) -> None:
  """A tile continues its neighbours' objects from FOV centres inside their half of the
  overlap, at least half a FOV from its edge: the overlap must exceed the FOV wherever two tiles
  meet."""
  fov = [int(v) for v in fov_zyx]
  overlap = [int(v) for v in overlap_zyx]
  split = [len({t.index[d] for t in tiles}) > 1 for d in range(3)]
  if any(s and o <= f for s, o, f in zip(split, overlap, fov)):
    raise UserError(f"tile_mode=continue needs tile_overlap_zyx {tuple(overlap)} above the FOV "
                    f"{tuple(fov)} along every axis that is cut into tiles (a tile continues "
                    "its neighbours' objects from FOV centres in their half of the overlap); "
                    "raise the overlap or use tile_mode=independent")


def _claim(folder: str, tile: tiling.Tile, rank: int) -> bool:
  try:
    fd = os.open(os.path.join(folder, tile.name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(f"rank {rank} pid {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
  return True


def _tile_done(workdir: str, tile: tiling.Tile) -> bool:
  return resume.finished(os.path.join(workdir, "tiles", tile.name))


def run(config, workdir: str, explicit=()) -> dict:
  """Segments ``config``'s bbox tile by tile over this job's ranks, then stitches (rank 0).

  Each rank opens the job once (checkpoint, image, predictor: ``job.InferenceJob``) and
  segments every tile it claims with it. Returns the stitch summary (also ``stitch.json``) on
  rank 0, the tile counts elsewhere.
  """
  import jax  # jax, MPI: only once the job really runs

  from ffn_jax import parallel
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  settings.flood_options(config)
  stitch_settings = _stitch_settings(config)
  mode = str(config.tile_mode)
  if mode not in TILE_MODES:
    raise UserError(f"tile_mode must be one of {TILE_MODES}, got {mode!r}")
  fmt = str(config.output_format)
  if fmt not in volumes.OUTPUT_FORMATS:
    raise UserError(f"output_format must be one of {volumes.OUTPUT_FORMATS}, got {fmt!r}")
  job = job_lib.InferenceJob.open(_tile_settings(config), explicit=explicit)
  bbox = job.bbox()
  tiles = tiling.plan(bbox[0], bbox[1], config.tile_size_zyx, config.tile_overlap_zyx)
  if mode == "continue":
    _check_continuation_overlap(tiles, job.model["fov_size_zyx"], config.tile_overlap_zyx)
  identity = job.identity(bbox)
  identity["tile_size_zyx"] = [int(v) for v in config.tile_size_zyx]
  identity["tile_overlap_zyx"] = [int(v) for v in config.tile_overlap_zyx]
  identity["tile_mode"] = mode
  context = bool(config.get("tile_context", False))
  if context:  # recorded only when on, so that earlier jobs' workdirs still resume
    identity["tile_context"] = True
  seed_source = _seed_source(config, bbox)
  if seed_source != "tile":  # likewise
    identity["tile_seeds"] = seed_source
  if seed_source == "halo":
    identity["seed_halo"] = int(config.seed_halo)

  dist = parallel.init()
  if dist.is_primary:
    os.makedirs(workdir, exist_ok=True)
    _check_tiling(workdir, identity, tiles)
  launch = dist.bcast(uuid.uuid4().hex[:12] if dist.is_primary else None)
  claims = os.path.join(workdir, "claims", launch)
  if dist.is_primary:
    os.makedirs(claims, exist_ok=True)
    _log(f"{len(tiles)} tiles of {tuple(config.tile_size_zyx)} (overlap "
         f"{tuple(config.tile_overlap_zyx)}, {mode}) over {dist.size} rank(s); compute: "
         f"{job.compute_dtype}, route {job.route} ({job.why}); checkpoint read once per rank")
  seeds_path = os.path.join(workdir, SEEDS)
  if seed_source == "job" and dist.is_primary and not os.path.exists(seeds_path) and not all(
      _tile_done(workdir, t) for t in tiles):
    t_seeds = time.perf_counter()
    seeds = job.seeds(bbox)
    tmp = f"{seeds_path}.{os.getpid()}.tmp.npy"
    np.save(tmp, seeds)
    os.replace(tmp, seeds_path)
    _log(f"{config.seed_policy} over the whole bbox: {len(seeds)} seeds in "
         f"{time.perf_counter() - t_seeds:.1f} s (tile_seeds=job)")
  dist.bcast(None)  # the claims folder (and seeds.npy) exist before anyone claims
  job_seeds = None
  if seed_source == "job" and os.path.exists(seeds_path):
    job_seeds = np.load(seeds_path, allow_pickle=False)

  device = parallel.rank_device(dist)
  if dist.size > 1 and device.platform != "cpu":
    _log(f"rank {dist.rank}: {device}")
  done_here = 0
  rounds = tiling.rounds(tiles) if mode == "continue" else [list(range(len(tiles)))]
  meter = progress.TiledProgress(lambda: sum(_tile_done(workdir, t) for t in tiles), len(tiles),
                                 dist.rank)
  with jax.default_device(device):
    job.set_params(jax.device_put(job.params, device))
    for r, members in enumerate(rounds):
      if r > 0 and not all(_tile_done(workdir, tiles[k]) for k in rounds[r - 1]):
        break  # a tile of the last round stopped: this round's priors are not all there
      for k in members:
        tile = tiles[k]
        if _tile_done(workdir, tile) or not _claim(claims, tile, dist.rank):
          continue
        _log(f"rank {dist.rank}: tile {tile.name} start {tile.start} size {tile.size}")
        folder = os.path.join(workdir, "tiles", tile.name)
        prior = None
        if r > 0:
          prior, links = tiling.priors(tiles, k, rounds[0], _reader(workdir, tiles))
          os.makedirs(folder, exist_ok=True)
          outputs.write_json(os.path.join(folder, PRIOR),
                             {"links": [[tiles[i].name, int(a)] for i, a in links]})
        seeds = job_seeds
        if seed_source == "halo":
          t_seeds = time.perf_counter()
          seeds = job.seeds(bbox, block=(tile.start, tile.size), halo=int(config.seed_halo))
          _log(f"rank {dist.rank}: tile {tile.name}: {len(seeds)} seeds over its block and a "
               f"halo of {int(config.seed_halo)} in {time.perf_counter() - t_seeds:.1f} s")
        counters = job.segment((tuple(tile.start), tuple(tile.size)), folder, prior=prior,
                               within=bbox if context else None, seeds_zyx=seeds,
                               tile_progress=meter.start(tile.name)).counters
        if not counters.get("complete"):
          break  # debug.stop_after_fov_calls: stopped as if killed
        done_here += 1
      dist.bcast(None)  # waits (polling, not spinning a core) for every rank's last tile
  counts = dist.allgather(done_here)
  opened = dist.allgather(dict(job.opened))
  if not dist.is_primary:
    return {"tiles_segmented": counts}
  missing = [t.name for t in tiles if not _tile_done(workdir, t)]
  if missing:
    raise UserError(f"tiles {missing} are not finished (a rank failed?); rerun the same command")
  summary = stitch(workdir, tiles, identity, stitch_settings, config, fmt, bbox)
  summary.update(tiles_segmented=counts, wall_s=time.perf_counter() - t0, ranks=dist.size,
                 checkpoint_loads=[o["checkpoint_loads"] for o in opened],
                 predictor_builds=[o["predictor_builds"] for o in opened])
  outputs.write_json(_beside(summary["output"], "stitch.json"), summary)
  _log(f"done: {summary['segments']} segments from {len(tiles)} tiles ({mode}), "
       f"{summary['continued']} objects continued ({summary['joins']} joined), "
       f"{summary['merges']} merges by the rule, "
       f"{summary['wall_s']:.1f} s -> {summary['output']}")
  return summary


def _tile_settings(config):
  """``config`` for the tiles' blocks: no preview per tile (the stitched volume is the output)."""
  c = config.copy_and_resolve_references()
  c.unlock()
  c.preview_slices = 0
  c.lock()
  return c


def _beside(out_path: str, name: str) -> str:
  """``segments.json`` / ``stitch.json`` of an output: plain beside the default output, prefixed
  with the output's name beside any other (``stitch.output``)."""
  folder, base = os.path.split(out_path)
  default = base in (outputs.SEGMENTATION, "segmentation")
  return os.path.join(folder, name if default else f"{base}.{name}")


def _check_tiling(workdir: str, identity: dict, tiles) -> None:
  path = os.path.join(workdir, TILING)
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f).get("identity") != identity:
        raise UserError(f"{workdir} holds the tiles of a different job; use another --workdir "
                        "(or delete it)")
  elif os.path.exists(os.path.join(workdir, outputs.SEGMENTATION)) or os.path.exists(
      os.path.join(workdir, resume.JOB)):
    raise UserError(f"{workdir} holds a single-box segmentation; use another --workdir")
  else:
    outputs.write_json(path, {"identity": identity, "tiles": [t.to_json() for t in tiles]})


def stitch(workdir: str, tiles, identity: dict, settings: dict, config, fmt: str, bbox) -> dict:
  """Global IDs across tile borders, then the volume written core by core."""
  t0 = time.perf_counter()
  import ffn_jax
  out_name = str(config.stitch.output) or (outputs.SEGMENTATION if fmt == "zarr" else
                                          "segmentation")
  out_path = os.path.join(workdir, out_name)
  attrs = {"offset_zyx": list(bbox[0]), "voxel_size_zyx": list(identity["voxel_size_zyx"]),
           "ffn_jax": {"version": ffn_jax.__version__, "job": identity, "stitch": settings}}
  if os.path.exists(out_path):
    have = volumes.open_volume(out_path).attrs.get("ffn_jax", {})
    if have.get("job") != identity or have.get("stitch") != settings:
      raise UserError(f"{out_path} holds another job's or stitching's output; set "
                      "--config.stitch.output=NAME to write this one beside it")
    _log(f"{out_path} already holds this stitching; nothing to do")
    with open(_beside(out_path, "stitch.json")) as f:
      return json.load(f)

  read = _reader(workdir, tiles)
  links = prior_links(workdir, tiles, read, settings["min_overlap_voxels"],
                      settings["join_fraction"])
  rule = {k: v for k, v in settings.items() if k != "join_fraction"}
  result = tiling.stitch_tables(tiles, read, bbox[0], bbox[1], links=links, **rule)
  tables, n = result.tables, result.segments
  dtype = np.uint32 if n < 2**32 else np.uint64
  writer = volumes.SegmentationWriter(out_path, fmt, bbox[1], bbox[0],
                                      identity["voxel_size_zyx"], dtype, attrs)
  sizes = np.zeros(n + 1, np.int64)
  for core_start, core in tiling.cores(tiles, tables, read):
    core = core.astype(dtype)
    writer.write(tuple(a - b for a, b in zip(core_start, bbox[0])), core)
    sizes += np.bincount(core.ravel().astype(np.int64), minlength=n + 1)
  writer.finish()
  outputs.write_json(_beside(out_path, "segments.json"),
                    {str(i): int(v) for i, v in enumerate(sizes) if i > 0 and v > 0})
  return {"output": out_path, "output_format": fmt, "segments": int(np.count_nonzero(sizes[1:])),
          "merges": len(result.merges), "continued": sum(i != j for j, _, i, _ in links),
          "joins": sum(i == j for j, _, i, _ in links),
          "tile_segments": result.tile_segments,
          "voxels_labelled": int(sizes[1:].sum()), "voxels_total": int(np.prod(bbox[1])),
          "stitch": settings, "time_stitch_s": time.perf_counter() - t0,
          "bbox_start_zyx": list(bbox[0]), "bbox_size_zyx": list(bbox[1]),
          "tiles": len(tiles)}


def _reader(workdir: str, tiles):
  """``read(k, start, size)``: tile ``k``'s local labels in a box given in volume coordinates
  (tiles opened on first use)."""
  segs = {}

  def read(k: int, start, size) -> np.ndarray:
    if k not in segs:
      segs[k] = volumes.open_volume(
          os.path.join(workdir, "tiles", tiles[k].name, outputs.SEGMENTATION))
    return segs[k].read(tuple(a - b for a, b in zip(start, tiles[k].start)), size)

  return read


def prior_links(workdir: str, tiles, read, join_voxels: int,
                join_fraction: float) -> list[tuple[int, int, int, int]]:
  """(tile j, local k, tile i, local a) pairs that are one object: each continued prior object
  and its origin (the tiles' ``prior.json``), and a tile's segments with the prior objects their
  floods covered (``tiling.joins``, from ``segments.json``). None in ``independent`` mode."""
  index = {t.name: i for i, t in enumerate(tiles)}
  first = tiling.rounds(tiles)[0]
  links = []
  for j, t in enumerate(tiles):
    folder = os.path.join(workdir, "tiles", t.name)
    if not os.path.exists(os.path.join(folder, PRIOR)):
      continue
    with open(os.path.join(folder, PRIOR)) as f:
      back = json.load(f)["links"]
    links += [(j, k, index[name], int(a)) for k, (name, a) in enumerate(back, start=1)]
    with open(os.path.join(folder, "segments.json")) as f:
      overlaps = {int(sid): {int(k): int(n) for k, n in info["overlaps"].items()}
                  for sid, info in json.load(f).items()}
    prior, _ = tiling.priors(tiles, j, first, read)
    seg = read(j, t.start, t.size)
    n = max(len(back), int(seg.max(initial=0))) + 1
    sizes = np.bincount(seg.ravel().astype(np.int64), minlength=n)
    links += [(j, sid, j, k) for sid, k in tiling.joins(
        overlaps, len(back), np.bincount(prior.ravel(), minlength=n), sizes, join_voxels,
        join_fraction)]
  return links
