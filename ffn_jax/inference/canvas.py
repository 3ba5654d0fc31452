"""The inference canvas: flood-fills segments from seeds with a batched FFN (host-side numpy).

Semantics follow Google's ``Canvas.segment_all`` / ``segment_at`` / ``update_at``:

- every segment starts from a seed with a fresh object map (logits; NaN = never predicted)
  holding ``init_activation`` at the seed; unpredicted voxels enter the model as ``pad_value``;
- the FOV moves by the face-max policy; a position is skipped if its map value is below
  ``move_threshold``, its FOV leaves the canvas, it is already segmented, or the mask excludes it;
- a segment stops early when its seed voxel drops below ``move_threshold`` and is then rejected;
- "disconnected seed" freezing (``disco_seed_threshold`` >= 0): a prediction may not raise a voxel
  that an earlier prediction put below p = 0.5;
- a finished segment claims the voxels >= ``segment_threshold`` that no earlier segment owns,
  if at least ``min_segment_size`` of them remain; overlaps with earlier segments are recorded;
- seeds inside or within ``min_boundary_dist`` of an existing segment are skipped.

Batching by speculation. With ``batch_size`` K > 1 several segments (the next seeds in seed
order) are flooded at once, one FOV of each per device call. A segment only reads shared state
(the segmentation) at its seed box and at positions it pops, and it is committed strictly in
seed order, so each commit re-checks the later in-flight segments: a segment whose seed box is
now segmented is dropped (exactly as the sequential run would skip that seed); one that popped a
now-segmented position is restarted from its seed. Everything else it did is what the sequential
run would do, so the segmentation equals the batch-1 (Google) one; only FOV work is wasted. A
later segment pauses while its next position or its seed lies inside an earlier in-flight
segment's object (>= segment_threshold), which is where conflicts come from.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import numpy as np

from ffn_jax import model as model_lib
from ffn_jax.inference.movement import FaceMaxPolicy
from ffn_jax.inference.seed import SeedList

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """Google's InferenceOptions; thresholds are probabilities (converted to logits inside)."""
  init_activation: float = 0.95
  pad_value: float = 0.05
  move_threshold: float = 0.9
  segment_threshold: float = 0.6
  min_segment_size: int = 1000
  min_boundary_dist_zyx: tuple = (1, 1, 1)
  disco_seed_threshold: float = 0.0  # < 0 disables disconnected-seed freezing


def logit32(p: float) -> np.float32:
  """A probability threshold as the float32 logit Google's canvas compares against.

  Google stores options in float32 proto fields: p is rounded to float32, converted with a
  float64 logit and stored (rounded) as float32 again.
  """
  return np.float32(model_lib.logit(float(np.float32(p))))


class Thresholds:
  """The logit-space thresholds of one InferenceOptions."""

  def __init__(self, o: InferenceOptions):
    for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
      p = getattr(o, name)
      if not 0.0 < p < 1.0:
        raise ValueError(f"{name} must be a probability in (0, 1), got {p}")
    self.init = logit32(o.init_activation)
    self.pad = logit32(o.pad_value)
    self.move = logit32(o.move_threshold)
    self.segment = logit32(o.segment_threshold)
    # Google's movement policy gets logit(move_threshold) in float64 and compares the float32
    # face maxima against it in float64 (numpy 1.x scalar promotion).
    self.move_f64 = model_lib.logit(float(np.float32(o.move_threshold)))
    self.disco = float(o.disco_seed_threshold)
    self.min_size = int(o.min_segment_size)
    self.mbd = np.asarray(o.min_boundary_dist_zyx, np.int64)


class _Segment:
  """One segment being flooded: its object map, move queue and extent.

  The canvas-sized object map is allocated when the segment first runs (``activate``), so
  waiting segments in the look-ahead window cost no memory.
  """

  def __init__(self, cand_idx: int, start, canvas: "Canvas"):
    self.cand_idx = int(cand_idx)
    self.start = tuple(int(v) for v in start)
    self.policy = FaceMaxPolicy(canvas.deltas, canvas.th.move_f64)
    self.seed = None
    self._shape = canvas.shape
    self._init = canvas.th.init
    self.reset()

  def activate(self) -> None:
    if self.seed is None:
      self.seed = np.empty(self._shape, np.float32)
      self.reset()

  def reset(self) -> None:
    if self.seed is not None:
      self.seed.fill(np.nan)
      self.seed[self.start] = self._init
    self.policy.reset(self.start)
    self.iters = 0
    self.min_pos = np.array(self.start)
    self.max_pos = np.array(self.start)
    self.done = False
    self.consulted: list = []  # positions whose segmentation value decided a pop

  def get_state(self) -> dict:
    st = {f"policy_{k}": v for k, v in self.policy.get_state().items()}
    st.update(cand_idx=np.int64(self.cand_idx), start=np.array(self.start, np.int64),
              seed=self.seed, iters=np.int64(self.iters), min_pos=self.min_pos,
              max_pos=self.max_pos, done=np.bool_(self.done))
    return st

  def set_state(self, st: dict) -> None:
    self.activate()
    self.seed[...] = st["seed"]
    self.policy.set_state({k[len("policy_"):]: v for k, v in st.items()
                           if k.startswith("policy_")})
    self.iters = int(st["iters"])
    self.min_pos = np.asarray(st["min_pos"], np.int64)
    self.max_pos = np.asarray(st["max_pos"], np.int64)
    self.done = bool(st["done"])


class Canvas:
  """Segments one image block; see the module docstring.

  Args:
    image: normalized float32 image [z, y, x] (the whole canvas).
    predict: ``predict(image_BZYX, seed_BZYX) -> logits_BZYX`` for 1..batch_size FOVs.
    batch_size: FOVs per predict call (K segments in flight); 1 = Google's sequential order.
    fov_size_zyx, deltas_zyx: model FOV and movement step.
    options: InferenceOptions.
    mask: optional bool [z, y, x]; True = never segment or seed there.
    max_pending: look-ahead: segments in flight incl. paused / not yet started ones; default 1
      for K = 1, else 4K. Each started one holds a canvas-sized float32 map.
  """

  def __init__(self, image: np.ndarray, predict: Callable, batch_size: int, fov_size_zyx,
               deltas_zyx, options: InferenceOptions, mask: np.ndarray | None = None,
               max_pending: int | None = None):
    self.image = image
    self.shape = tuple(image.shape)
    self.predict = predict
    self.batch_size = int(batch_size)
    self.fov = np.asarray(fov_size_zyx, np.int64)
    self.margin = self.fov // 2
    self.deltas = np.asarray(deltas_zyx, np.int64)
    self.options = options
    self.th = Thresholds(options)
    self.mask = mask
    if max_pending is None:
      max_pending = 1 if self.batch_size == 1 else 4 * self.batch_size
    self.max_pending = max(int(max_pending), self.batch_size)
    self.segmentation = np.zeros(self.shape, np.int32)
    self.max_id = 0
    self.origins: dict = {}   # id -> (seed zyx, FOV iterations, voxels)
    self.overlaps: dict = {}  # id -> (earlier ids overlapped, overlapping voxel counts)
    self.counters: dict = {}
    self.jobs: list[_Segment] = []
    self.seeds: SeedList | None = None

  # ----------------------------------------------------------------------------- driving
  def set_seeds(self, coords: np.ndarray, idx: int = 0) -> None:
    self.seeds = SeedList(coords, self.shape, self.margin, idx)

  def segment_all(self, on_step: Callable | None = None) -> None:
    """Runs until every seed is resolved; ``on_step(canvas)`` is called after each batch."""
    if self.seeds is None:
      raise ValueError("set_seeds() or load_state() first")
    while True:
      self._commit_finished()
      self._fill()
      if not self.jobs:
        break
      if self._step() and on_step is not None:
        on_step(self)
    if on_step is not None:
      on_step(self)

  def progress(self) -> tuple[int, int]:
    """(seeds resolved in order, total seeds)."""
    done = self.jobs[0].cand_idx if self.jobs else self.seeds.idx
    return done, len(self.seeds)

  def count(self, name: str, n=1) -> None:
    """Adds ``n`` to counter ``name`` (saved with the state, written to counters.json)."""
    self.counters[name] = self.counters.get(name, 0) + n

  # ----------------------------------------------------------------------------- seeds
  def _box(self, center, radius):
    lo = np.maximum(np.asarray(center) - radius, 0)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, np.asarray(center) + radius + 1))

  def _fill(self) -> None:
    """Starts segments for the next seeds until ``max_pending`` are in flight."""
    while len(self.jobs) < self.max_pending:
      nxt = self.seeds.next()
      if nxt is None:
        return
      idx, pos = nxt
      # Segmentation only grows, so a seed that fails now fails in the sequential order too.
      if self.segmentation[pos] > 0:
        self.count("seeds_skipped_segmented")
        continue
      if self.mask is not None and self.mask[pos]:
        self.count("seeds_skipped_masked")
        continue
      if np.any(self.segmentation[self._box(pos, self.th.mbd)] > 0):
        self.count("seeds_skipped_boundary")
        continue
      self.jobs.append(_Segment(idx, pos, self))

  # ----------------------------------------------------------------------------- flooding
  def _valid_move(self, job: _Segment, pos) -> bool:
    p = np.asarray(pos)
    if np.any(p < 0) or np.any(p >= self.shape):
      self.count("skip_invalid_pos")
      return False
    if job.seed[pos] < self.th.move:
      self.count("skip_threshold")
      return False
    if np.any(p - self.margin < 0) or np.any(p + self.margin >= self.shape):
      self.count("skip_invalid_pos")
      return False
    job.consulted.append(pos)
    if self.segmentation[pos] > 0:
      self.count("skip_invalid_pos")
      return False
    return True

  def _next_position(self, job: _Segment):
    """Google's ``for pos in movement_policy`` loop head: the next FOV centre, or None."""
    while True:
      pos = job.policy.pop(lambda p: self._valid_move(job, p))
      if pos is None:
        job.done = True
        return None
      if job.seed[job.start] < self.th.move:
        self.count("seed_got_too_weak")
        job.done = True
        return None
      if self.mask is not None and self.mask[pos]:
        self.count("skip_restricted_pos")
        continue
      return pos

  def _blocked(self, job: _Segment, earlier: list) -> bool:
    """True if ``job`` would likely collide with an earlier in-flight segment's object."""
    points = [job.start]
    head = job.policy.peek()
    if head is not None and all(0 <= v < s for v, s in zip(head, self.shape)):
      points.append(head)
    for other in earlier:
      if other.seed is None:
        continue
      for p in points:
        if other.seed[p] >= self.th.segment:
          return True
    return False

  def _step(self) -> bool:
    """Advances up to ``batch_size`` segments by one FOV each; False if nothing was predicted."""
    batch = []
    for i, job in enumerate(self.jobs):
      if len(batch) == self.batch_size:
        break
      if job.done:
        continue
      if i > 0 and self._blocked(job, self.jobs[:i]):
        self.count("paused")
        continue
      job.activate()
      pos = self._next_position(job)
      if pos is not None:
        batch.append((job, pos))
    if not batch:
      return False
    images, seeds = [], []
    for job, pos in batch:
      sel = self._box(pos, self.margin)
      images.append(self.image[sel])
      s = job.seed[sel].copy()
      s[np.isnan(s)] = self.th.pad
      seeds.append(s)
    t0 = time.perf_counter()
    logits = self.predict(np.stack(images), np.stack(seeds))
    self.count("time_predict_s", time.perf_counter() - t0)
    self.count("fov_calls", len(batch))
    self.count("batches")
    for (job, pos), lg in zip(batch, logits):
      self._apply(job, pos, np.array(lg, np.float32))
    return True

  def _apply(self, job: _Segment, pos, logits: np.ndarray) -> None:
    """Google's ``update_at`` after the prediction, then the movement update."""
    sel = self._box(pos, self.margin)
    if self.th.disco >= 0 and np.mean(logits >= self.th.move) > self.th.disco:
      old = job.seed[sel]
      with np.errstate(invalid="ignore"):  # NaN (never predicted) compares False: not frozen
        frozen = (old < 0.0) & (logits > old)
      logits[frozen] = old[frozen]
    job.seed[sel] = logits
    job.min_pos = np.minimum(job.min_pos, pos)
    job.max_pos = np.maximum(job.max_pos, pos)
    job.iters += 1
    job.policy.update(logits, pos)

  # ----------------------------------------------------------------------------- commits
  def _commit_finished(self) -> None:
    while self.jobs and self.jobs[0].done:
      job = self.jobs.pop(0)
      t0 = time.perf_counter()
      self._commit(job)
      self.count("time_commit_s", time.perf_counter() - t0)
      if self.jobs:
        self.jobs[0].consulted = []  # the new head is no longer speculative

  def _commit(self, job: _Segment) -> None:
    self.count("seeds_tried")
    if job.iters <= 0:
      self.count("failed_no_fov")
      return
    if job.seed[job.start] < self.th.move:
      self.count("failed_weak_seed")
      return
    half = self.fov // 2
    lo = np.maximum(job.min_pos - half, 0)
    hi = np.minimum(job.max_pos + half + 1, self.shape)
    sel = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    seg = self.segmentation[sel]
    mask = job.seed[sel] >= self.th.segment
    raw = int(mask.sum())
    ids, counts = np.unique(seg[mask], return_counts=True)
    keep = ids > 0
    mask &= seg <= 0
    size = int(mask.sum())
    if size < self.th.min_size:
      self.count("failed_too_small")
      return
    self.max_id += 1
    while self.max_id in self.origins:
      self.max_id += 1
    seg[mask] = self.max_id
    self.origins[self.max_id] = (job.start, job.iters, size)
    self.overlaps[self.max_id] = (ids[keep].astype(np.int64), counts[keep].astype(np.int64))
    self.count("segments")
    self.count("voxels_labelled", size)
    self.count("voxels_overlapping", raw - size)
    self._revalidate(lo, mask)

  def _revalidate(self, lo: np.ndarray, new_mask: np.ndarray) -> None:
    """Drops / restarts later in-flight segments that read what the last commit changed."""

    def hit(points) -> bool:
      if not len(points):
        return False
      rel = np.asarray(points, np.int64).reshape(-1, 3) - lo
      ok = np.all((rel >= 0) & (rel < new_mask.shape), axis=1)
      rel = rel[ok]
      return bool(np.any(new_mask[rel[:, 0], rel[:, 1], rel[:, 2]]))

    kept = []
    for job in self.jobs:
      box = self._box(job.start, self.th.mbd)
      b_lo = np.array([s.start for s in box]) - lo
      b_hi = np.array([s.stop for s in box]) - lo
      c_lo, c_hi = np.maximum(b_lo, 0), np.minimum(b_hi, new_mask.shape)
      if np.all(c_hi > c_lo) and new_mask[tuple(slice(a, b) for a, b in zip(c_lo, c_hi))].any():
        self.count("seeds_skipped_segmented" if hit([job.start]) else "seeds_skipped_boundary")
        self.count("fov_wasted", job.iters)
        self.count("speculative_drops")
        continue
      if hit(job.consulted):
        self.count("fov_wasted", job.iters)
        self.count("speculative_restarts")
        job.reset()
      kept.append(job)
    self.jobs = kept

  # ----------------------------------------------------------------------------- state
  def state_dict(self) -> dict:
    """Everything needed to resume, as plain arrays (for np.savez, allow_pickle=False).

    The head segment (the oldest in flight) is saved with its object map and queue; later,
    speculative ones are not: the seed list resumes right after the head and redoes them.
    """
    ids = sorted(self.origins)
    ov_sid, ov_id, ov_cnt = [], [], []
    for sid in ids:
      o_ids, o_counts = self.overlaps.get(sid, ((), ()))
      ov_sid += [sid] * len(o_ids)
      ov_id += list(o_ids)
      ov_cnt += list(o_counts)
    st = {
        "version": np.int64(STATE_VERSION),
        "segmentation": self.segmentation,
        "max_id": np.int64(self.max_id),
        "seed_coords": self.seeds.coords,
        "origin_ids": np.array(ids, np.int64),
        "origin_zyx": np.array([self.origins[i][0] for i in ids], np.int64).reshape(-1, 3),
        "origin_iters": np.array([self.origins[i][1] for i in ids], np.int64),
        "origin_sizes": np.array([self.origins[i][2] for i in ids], np.int64),
        "overlap_sid": np.array(ov_sid, np.int64),
        "overlap_id": np.array(ov_id, np.int64),
        "overlap_count": np.array(ov_cnt, np.int64),
        "counters_json": np.array(json.dumps(self.counters)),
    }
    head = self.jobs[0] if self.jobs else None
    if head is not None and head.iters > 0:
      st["seed_idx"] = np.int64(head.cand_idx + 1)
      st.update({f"head_{k}": v for k, v in head.get_state().items()})
    else:
      st["seed_idx"] = np.int64(head.cand_idx if head is not None else self.seeds.idx)
    return st

  def load_state(self, st: dict) -> None:
    """Restores ``state_dict()`` output (seed list included)."""
    if int(st["version"]) != STATE_VERSION:
      raise ValueError(f"inference state version {int(st['version'])} != {STATE_VERSION}")
    if tuple(st["segmentation"].shape) != self.shape:
      raise ValueError(f"saved segmentation shape {st['segmentation'].shape} != {self.shape}")
    self.segmentation = np.array(st["segmentation"], np.int32)
    self.max_id = int(st["max_id"])
    self.origins = {int(i): (tuple(int(v) for v in z), int(n), int(s)) for i, z, n, s in zip(
        st["origin_ids"], st["origin_zyx"], st["origin_iters"], st["origin_sizes"])}
    self.overlaps = {i: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for i in self.origins}
    for sid in self.origins:
      sel = st["overlap_sid"] == sid
      self.overlaps[sid] = (st["overlap_id"][sel].astype(np.int64),
                            st["overlap_count"][sel].astype(np.int64))
    self.counters = json.loads(str(st["counters_json"]))
    self.set_seeds(st["seed_coords"], int(st["seed_idx"]))
    self.jobs = []
    if "head_seed" in st:
      head = {k[len("head_"):]: v for k, v in st.items() if k.startswith("head_")}
      job = _Segment(int(head["cand_idx"]), head["start"], self)
      job.set_state(head)
      self.jobs.append(job)
