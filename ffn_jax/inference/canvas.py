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

Prior labels (``prior``, e.g. the segments of a neighbouring tile in its part of this canvas)
start the segmentation. Before any seed, each prior object is *continued*: a segment whose
object map starts at ``init_activation`` on that object's voxels, whose FOV starts at every
lattice cell (``deltas``) of the object where a FOV fits, and which commits what it floods under
the prior label. It floods as any segment does, except that it may pass through its own prior
voxels and is never rejected for a weak start. So an object that enters from a neighbour grows
on as it would have in one pass over both, keeping its label. Like every segment, it records
the earlier labels its flood covered (``overlaps``): an object that enters through two faces is
continued from the first, whose flood covers the second face's prior voxels of the same object,
which it may not relabel (``tiling.joins`` reads that).

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

import time
from typing import Callable

import numpy as np

from ffn_jax.inference import canvas_state
from ffn_jax.inference.options import InferenceOptions, Thresholds
from ffn_jax.inference.seed import SeedList
from ffn_jax.inference.segment import MapPool, Segment


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
    prior: optional int [z, y, x] labels 1..P (0 = none) the segmentation starts with; each is
      continued before the seeds (module docstring), and new segments get IDs above P.
  """

  def __init__(self, image: np.ndarray, predict: Callable, batch_size: int, fov_size_zyx,
               deltas_zyx, options: InferenceOptions, mask: np.ndarray | None = None,
               max_pending: int | None = None, prior: np.ndarray | None = None):
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
    self.maps = MapPool(self.shape, self.max_pending)
    self.segmentation = np.zeros(self.shape, np.int32)
    self.max_id = 0
    self.prior = None
    self.n_prior = 0
    self.continuations: list = []  # (prior label, [N, 3] FOV starts), in label order
    self.cont_idx = 0  # next continuation to start
    if prior is not None:
      self.set_prior(prior)
    self.origins: dict = {}   # id -> (seed zyx, FOV iterations, voxels)
    self.overlaps: dict = {}  # id -> (earlier ids overlapped, overlapping voxel counts)
    self.counters: dict = {}
    self.jobs: list[Segment] = []
    self.seeds: SeedList | None = None

  # ----------------------------------------------------------------------------- driving
  def set_seeds(self, coords: np.ndarray, idx: int = 0) -> None:
    self.seeds = SeedList(coords, self.shape, self.margin, idx)

  def set_prior(self, prior: np.ndarray) -> None:
    """Starts the segmentation from ``prior`` labels and plans their continuations."""
    prior = np.asarray(prior)
    if prior.shape != self.shape:
      raise ValueError(f"prior labels of shape {prior.shape} != canvas {self.shape}")
    self.prior = prior.astype(np.int32)
    self.segmentation = self.prior.copy()
    self.n_prior = self.max_id = int(self.prior.max(initial=0))
    self.continuations = continuation_starts(self.prior, self.margin, self.deltas, self.mask)
    self.cont_idx = 0

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
    """(candidates resolved in order, total candidates): continuations, then seeds."""
    n = len(self.continuations)
    done = self.jobs[0].cand_idx + n if self.jobs else self.cont_idx + self.seeds.idx
    return done, n + len(self.seeds)

  def open_candidates(self) -> int:
    """Candidates that may still cost FOVs: the segments in flight, the continuations not yet
    started, and the seeds not yet started whose voxel no segment holds and no segment in
    flight has reached (>= ``segment_threshold``): a seed inside a flooded object is skipped
    for free. Progress estimates count this down (``progress.FloodProgress``)."""
    rest = self.seeds.coords[self.seeds.idx:] if self.seeds is not None else np.zeros((0, 3))
    idx = tuple(np.asarray(rest, np.int64).T)
    open_ = self.segmentation[idx] == 0 if len(rest) else np.zeros(0, bool)
    for job in self.jobs:
      if job.seed is not None and open_.any():
        open_ &= ~(job.seed[idx] >= self.th.segment)
    return int(open_.sum()) + len(self.jobs) + len(self.continuations) - self.cont_idx

  def covered_voxels(self) -> int:
    """Voxels that a segment holds or a segment in flight has reached (>= ``segment_threshold``):
    the volume the flood has covered so far (``progress.FloodProgress``). Costs one pass over
    the canvas plus each in-flight map's written box."""
    covered = self.segmentation != 0
    for job in self.jobs:
      if job.seed is not None:
        box = job.written_box()
        covered[box] |= job.seed[box] >= self.th.segment
    return int(np.count_nonzero(covered))

  def count(self, name: str, n=1) -> None:
    """Adds ``n`` to counter ``name`` (saved with the state, written to counters.json)."""
    self.counters[name] = self.counters.get(name, 0) + n

  # ----------------------------------------------------------------------------- seeds
  def _box(self, center, radius):
    lo = np.maximum(np.asarray(center) - radius, 0)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, np.asarray(center) + radius + 1))

  def _fill(self) -> None:
    """Starts segments for the next continuations, then seeds, until ``max_pending`` are in
    flight. Continuations have negative candidate indices, so all come before seed 0."""
    n = len(self.continuations)
    while len(self.jobs) < self.max_pending and self.cont_idx < n:
      label, starts = self.continuations[self.cont_idx]
      self.jobs.append(Segment(self.cont_idx - n, starts, self, label=label))
      self.cont_idx += 1
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
      self.jobs.append(Segment(idx, pos, self))

  # ----------------------------------------------------------------------------- flooding
  def _valid_move(self, job: Segment, pos) -> bool:
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
    if self.segmentation[pos] > 0 and self.segmentation[pos] != job.label:
      self.count("skip_invalid_pos")
      return False
    return True

  def _next_position(self, job: Segment):
    """Google's ``for pos in movement_policy`` loop head: the next FOV centre, or None."""
    while True:
      pos = job.policy.pop(lambda p: self._valid_move(job, p))
      if pos is None:
        job.done = True
        return None
      if not job.label and job.seed[job.start] < self.th.move:
        self.count("seed_got_too_weak")
        job.done = True
        return None
      if self.mask is not None and self.mask[pos]:
        self.count("skip_restricted_pos")
        continue
      return pos

  def _blocked(self, job: Segment, earlier: list) -> bool:
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

  def _apply(self, job: Segment, pos, logits: np.ndarray) -> None:
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
      job.release()
      self.count("time_commit_s", time.perf_counter() - t0)
      if self.jobs:
        self.jobs[0].consulted = []  # the new head is no longer speculative

  def _commit(self, job: Segment) -> None:
    self.count("seeds_tried")
    if job.iters <= 0:
      self.count("failed_no_fov")
      return
    if not job.label and job.seed[job.start] < self.th.move:
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
    if job.label:
      keep &= ids != job.label
    mask &= seg <= 0
    size = int(mask.sum())
    if job.label:  # a continuation: its prior object is kept whatever it adds
      sid = job.label
      self.count("continued")
      self.count("voxels_continued", size)
    elif size < self.th.min_size:
      self.count("failed_too_small")
      return
    else:
      self.max_id += 1
      while self.max_id in self.origins:
        self.max_id += 1
      sid = self.max_id
      self.count("segments")
    seg[mask] = sid
    self.origins[sid] = (job.start, job.iters, size)
    self.overlaps[sid] = (ids[keep].astype(np.int64), counts[keep].astype(np.int64))
    if not job.label:
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
      if job.label:  # a continuation starts inside its own object: never dropped
        if hit(job.consulted):
          self.count("fov_wasted", job.iters)
          self.count("speculative_restarts")
          job.reset()
        kept.append(job)
        continue
      box = self._box(job.start, self.th.mbd)
      b_lo = np.array([s.start for s in box]) - lo
      b_hi = np.array([s.stop for s in box]) - lo
      c_lo, c_hi = np.maximum(b_lo, 0), np.minimum(b_hi, new_mask.shape)
      if np.all(c_hi > c_lo) and new_mask[tuple(slice(a, b) for a, b in zip(c_lo, c_hi))].any():
        self.count("seeds_skipped_segmented" if hit([job.start]) else "seeds_skipped_boundary")
        self.count("fov_wasted", job.iters)
        self.count("speculative_drops")
        job.release()
        continue
      if hit(job.consulted):
        self.count("fov_wasted", job.iters)
        self.count("speculative_restarts")
        job.reset()
      kept.append(job)
    self.jobs = kept

  # ----------------------------------------------------------------------------- state
  def state_dict(self) -> dict:
    """Everything needed to resume (``canvas_state.state_dict``)."""
    return canvas_state.state_dict(self)

  def load_state(self, st: dict) -> None:
    """Restores ``state_dict()`` output (seed list included)."""
    canvas_state.load_state(self, st)


def continuation_starts(prior: np.ndarray, margin, deltas, mask: np.ndarray | None = None):
  """Where the continuation of each prior object starts: per label (ascending), one voxel of
  the object in every lattice cell (``deltas``, from the canvas origin) that holds voxels where
  a FOV fits (``margin`` from every edge, outside ``mask``), the one nearest their centroid;
  cells in z, y, x order. Labels with no such voxel are left out.

  Returns:
    list of (label, int64 [N, 3] zyx starts).
  """
  margin = np.asarray(margin, np.int64)
  inner = tuple(slice(int(m), int(s - m)) for m, s in zip(margin, prior.shape))
  labels = prior[inner]
  valid = labels > 0
  if mask is not None:
    valid &= ~np.asarray(mask[inner], bool)
  coords = np.argwhere(valid).astype(np.int64) + margin
  if not len(coords):
    return []
  lab = prior[tuple(coords.T)].astype(np.int64)
  cells = coords // np.maximum(np.asarray(deltas, np.int64), 1)
  keys = np.concatenate([lab[:, None], cells], axis=1)
  groups, inv = np.unique(keys, axis=0, return_inverse=True)
  inv = inv.ravel()
  counts = np.bincount(inv)
  centroid = np.stack([np.bincount(inv, coords[:, d]) for d in range(3)], axis=1) / counts[:, None]
  dist = ((coords - centroid[inv]) ** 2).sum(axis=1)
  order = np.lexsort((dist, inv))  # by group, nearest first
  first = order[np.r_[True, inv[order][1:] != inv[order][:-1]]]
  starts = coords[first]  # one per group, in group (label, cell) order
  out = []
  for label in np.unique(groups[:, 0]):
    out.append((int(label), starts[groups[:, 0] == label]))
  return out
