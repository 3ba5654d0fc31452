"""Partitions and class-balanced sampling coordinates (Google's compute_partitions /
build_coordinates semantics).

Every voxel of an object gets the fraction of voxels of its own label inside the box of radius
``lom_radius_zyx`` around it, quantized by ``thresholds`` into classes 1..len(thresholds)+1
(``np.digitize`` + 1). Class 0 means "never sample": label 0, objects smaller than ``min_size``,
and the ``margin_zyx`` border. Sampling then draws every class equally often.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from scipy import ndimage

from ffn_jax.errors import UserError


def compute_partitions(labels_ZYX: np.ndarray, thresholds, lom_radius_zyx, min_size: int = 0,
                       margin_zyx=(0, 0, 0)) -> np.ndarray:
  """Returns uint8 partition classes for every voxel (0 = excluded)."""
  thresholds = np.asarray(thresholds, np.float64)
  if thresholds.ndim != 1 or len(thresholds) == 0 or np.any(np.diff(thresholds) <= 0):
    raise UserError(f"partition thresholds must be a non-empty increasing list, got {thresholds}")
  if labels_ZYX.size and labels_ZYX.min() < 0:
    raise UserError(f"labels contain negative IDs (min {labels_ZYX.min()}); object IDs must be "
                    ">= 0 (0 = background)")
  radius = np.asarray(lom_radius_zyx, int)
  diam = 2 * radius + 1
  out = np.zeros(labels_ZYX.shape, np.uint8)
  objects = ndimage.find_objects(labels_ZYX.astype(np.int64, copy=False)) \
      if labels_ZYX.dtype != np.int64 else ndimage.find_objects(labels_ZYX)
  sizes = np.bincount(labels_ZYX.ravel().astype(np.int64))
  for index, box in enumerate(objects):
    label = index + 1
    if box is None or label == 0 or sizes[label] < max(min_size, 1):
      continue
    # Grow the box by the radius so the box filter sees all of its context.
    grown = tuple(slice(max(s.start - r, 0), min(s.stop + r, n))
                  for s, r, n in zip(box, radius, labels_ZYX.shape))
    mask = labels_ZYX[grown] == label
    fraction = ndimage.uniform_filter(mask.astype(np.float32), size=diam, mode="constant")
    classes = (np.digitize(fraction, thresholds) + 1).astype(np.uint8)
    view = out[grown]
    view[mask] = classes[mask]
  margin = np.asarray(margin_zyx, int)
  for axis, m in enumerate(margin):
    if m > 0:
      sl = [slice(None)] * 3
      sl[axis] = slice(0, m)
      out[tuple(sl)] = 0
      sl[axis] = slice(out.shape[axis] - m, None)
      out[tuple(sl)] = 0
  return out


def coordinates_by_class(partitions_ZYX: np.ndarray) -> list[np.ndarray]:
  """Per non-empty class (ascending), the int32 zyx coordinates of its voxels."""
  flat = partitions_ZYX.ravel()
  order = np.argsort(flat, kind="stable")
  counts = np.bincount(flat, minlength=256)
  out = []
  start = counts[0]
  for c in range(1, 256):
    n = counts[c]
    if n:
      idx = order[start:start + n]
      out.append(np.stack(np.unravel_index(idx, partitions_ZYX.shape), axis=1).astype(np.int32))
    start += n
  return out


def cached_coordinates(labels_ZYX: np.ndarray, thresholds, lom_radius_zyx, min_size, margin_zyx,
                       cache_dir: str | None, log=print) -> list[np.ndarray]:
  """``coordinates_by_class(compute_partitions(...))``, cached in ``cache_dir`` by content hash."""
  key = hashlib.sha256()
  key.update(np.ascontiguousarray(labels_ZYX).tobytes())
  key.update(json.dumps([list(map(float, thresholds)), list(map(int, lom_radius_zyx)),
                         int(min_size), list(map(int, margin_zyx))]).encode())
  path = os.path.join(cache_dir, f"coords_{key.hexdigest()[:16]}.npz") if cache_dir else None
  if path and os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as z:
        return [z[f"class_{i}"] for i in range(len(z.files))]
    except (OSError, ValueError, KeyError) as e:
      log(f"warning: ignoring unreadable partition cache {path} ({e}); recomputing")
  parts = compute_partitions(labels_ZYX, thresholds, lom_radius_zyx, min_size, margin_zyx)
  coords = coordinates_by_class(parts)
  if not coords:
    raise UserError("no training coordinates: the label volume has no object of at least "
                    f"min_size={min_size} voxels outside the margin {tuple(margin_zyx)}")
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **{f"class_{i}": c for i, c in enumerate(coords)})
    os.replace(tmp, path)
  return coords


class BalancedSampler:
  """Class-balanced coordinates, sharded over ranks, reshuffled each epoch.

  Each class is oversampled (with a fixed random resample) to the size of the largest class, so
  all classes are equally frequent. An epoch is a permutation of these ``n_classes * max_count``
  virtual indices drawn from (seed, epoch); rank r takes every R-th entry. State = (epoch, pos).
  """

  def __init__(self, coords_by_class: list[np.ndarray], seed: int, rank: int = 0,
               num_ranks: int = 1):
    self.coords = coords_by_class
    self.seed, self.rank, self.num_ranks = int(seed), int(rank), int(num_ranks)
    self.max_count = max(len(c) for c in coords_by_class)
    self.total = self.max_count * len(coords_by_class)
    if self.total < num_ranks:
      raise UserError(f"only {self.total} sampling coordinates for {num_ranks} ranks")
    self._extra = []
    for c, arr in enumerate(coords_by_class):
      rng = np.random.default_rng([self.seed, 7919, c])
      self._extra.append(rng.integers(0, len(arr), self.max_count - len(arr)).astype(np.int64))
    self.epoch, self.pos = 0, 0
    self._shard_epoch, self._shard = None, None

  def _shard_for(self, epoch: int) -> np.ndarray:
    if self._shard_epoch != epoch:
      rng = np.random.default_rng([self.seed, 104729, epoch])
      dtype = np.int32 if self.total < 2**31 else np.int64
      perm = rng.permutation(np.arange(self.total, dtype=dtype))
      self._shard, self._shard_epoch = perm[self.rank::self.num_ranks].copy(), epoch
    return self._shard

  def lookup(self, virtual_index: int) -> np.ndarray:
    c, j = divmod(int(virtual_index), self.max_count)
    arr = self.coords[c]
    return arr[j] if j < len(arr) else arr[self._extra[c][j - len(arr)]]

  def class_of(self, virtual_index: int) -> int:
    return int(virtual_index) // self.max_count

  def next_index(self) -> int:
    shard = self._shard_for(self.epoch)
    # Every rank takes the same number per epoch so ranks stay in lockstep.
    per_rank = self.total // self.num_ranks
    if self.pos >= per_rank:
      self.epoch, self.pos = self.epoch + 1, 0
      shard = self._shard_for(self.epoch)
    v = int(shard[self.pos])
    self.pos += 1
    return v

  def next(self) -> np.ndarray:
    return self.lookup(self.next_index())

  def state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos}

  def restore(self, state: dict) -> None:
    self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
