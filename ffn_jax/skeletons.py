"""Ground-truth skeletons of a dense label box, by kimimaro's TEASAR, cached on disk.

``load_or_skeletonize(labels_ZYX, params)`` returns one ``skeleton_metrics.Skeleton`` per label
of at least ``params.dust_voxels`` voxels (0 is background), node coordinates in physical units
(voxel index x ``voxel_size_zyx``), zyx. The TEASAR lengths are set in voxels and scaled by the
voxel size, so a box skeletonizes to the same nodes whatever unit the voxel size is given in.

Cache: ``$FFN_JAX_CACHE/skeletons`` (default ``~/.cache/ffn_jax/skeletons``, the root of
``ffn_jax.ops.build.cache_dir``), one ``.npz`` per box keyed by a SHA-256 of the label array's
bytes, shape and dtype, the parameters and the kimimaro version; written under a temporary name
and renamed into place, read back with ``allow_pickle=False``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import tempfile

import numpy as np

from ffn_jax.errors import UserError
from ffn_jax.ops.build import cache_dir
from ffn_jax.skeleton_metrics import Skeleton, check_voxel_size

_FORMAT = "ffn_jax skeletons 1"


@dataclasses.dataclass(frozen=True)
class SkeletonParams:
  """How the ground truth is skeletonized.

  Attributes:
    voxel_size_zyx: physical size of a voxel (e.g. 10, 10, 10 nm for FIB-25).
    scale: TEASAR's invalidation sphere radius is ``scale`` x the distance to the boundary ...
    const_voxels: ... plus this many voxels (x the smallest voxel edge): branches shorter than
      that are not traced.
    dust_voxels: labels with fewer voxels get no skeleton.
  """
  voxel_size_zyx: tuple = (1.0, 1.0, 1.0)
  scale: float = 1.5
  const_voxels: float = 30.0
  dust_voxels: int = 1000

  def __post_init__(self):
    object.__setattr__(self, "voxel_size_zyx",
                       tuple(float(v) for v in check_voxel_size(self.voxel_size_zyx)))
    if not (self.scale >= 1 and self.const_voxels >= 0 and int(self.dust_voxels) >= 0):
      raise UserError(f"skeleton parameters need scale >= 1, const_voxels >= 0 and dust_voxels "
                      f">= 0, got {self.scale}, {self.const_voxels}, {self.dust_voxels}")

  def teasar(self) -> dict:
    """kimimaro's ``teasar_params``, lengths in physical units."""
    return {"scale": float(self.scale),
            "const": float(self.const_voxels) * min(self.voxel_size_zyx),
            "pdrf_scale": 100000, "pdrf_exponent": 4,
            # No cell bodies in these volumes: soma handling off.
            "soma_detection_threshold": 1e12, "soma_acceptance_threshold": 1e12,
            "soma_invalidation_scale": 1.0, "soma_invalidation_const": 0.0}


def skeletonize(labels_ZYX: np.ndarray, params: SkeletonParams) -> list[Skeleton]:
  """kimimaro skeletons of every label of ``labels_ZYX`` (no cache), in ascending label order."""
  import kimimaro  # local: a slow import, needed only when the cache misses
  labels_ZYX = _unsigned(labels_ZYX)
  by_label = kimimaro.skeletonize(
      labels_ZYX, teasar_params=params.teasar(), anisotropy=params.voxel_size_zyx,
      dust_threshold=int(params.dust_voxels), progress=False, parallel=1, fix_branching=True,
      fix_borders=True)
  return [Skeleton(int(label), np.asarray(s.vertices, np.float32).reshape(-1, 3),
                   np.asarray(s.edges, np.int64).reshape(-1, 2))
          for label, s in sorted(by_label.items())]


def load_or_skeletonize(labels_ZYX: np.ndarray, params: SkeletonParams,
                        directory: str | os.PathLike | None = None) -> tuple[list[Skeleton], bool]:
  """``skeletonize``'s result from the cache, or computed and stored there.

  Args:
    directory: the cache folder (default ``cache_dir() / "skeletons"``).
  Returns:
    (skeletons, whether they came from the cache).
  """
  labels_ZYX = _unsigned(labels_ZYX)
  folder = pathlib.Path(directory) if directory is not None else cache_dir() / "skeletons"
  path = folder / f"{cache_key(labels_ZYX, params)}.npz"
  if path.exists():
    try:
      return _read(path), True
    except (OSError, ValueError, KeyError):  # a damaged entry is recomputed and replaced
      pass
  skeletons = skeletonize(labels_ZYX, params)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    _write(path, skeletons)
  except OSError:
    pass  # a read-only cache costs time, not correctness
  return skeletons, False


def cache_key(labels_ZYX: np.ndarray, params: SkeletonParams) -> str:
  """SHA-256 (hex) of the label box and everything that shapes its skeletons."""
  try:
    kimimaro_version = importlib.metadata.version("kimimaro")
  except importlib.metadata.PackageNotFoundError:
    kimimaro_version = "none"
  h = hashlib.sha256()
  h.update(json.dumps([_FORMAT, kimimaro_version, list(labels_ZYX.shape), labels_ZYX.dtype.str,
                       dataclasses.asdict(params)]).encode())
  h.update(np.ascontiguousarray(labels_ZYX).data)
  return h.hexdigest()


def _unsigned(labels_ZYX: np.ndarray) -> np.ndarray:
  labels_ZYX = np.asarray(labels_ZYX)
  if labels_ZYX.dtype == np.bool_:
    return labels_ZYX.astype(np.uint8)
  if labels_ZYX.dtype.kind == "u":
    return labels_ZYX
  if labels_ZYX.dtype.kind == "i" and (not labels_ZYX.size or labels_ZYX.min() >= 0):
    return labels_ZYX.astype(np.dtype(f"u{labels_ZYX.dtype.itemsize}"))
  raise UserError(f"ground truth of dtype {labels_ZYX.dtype} cannot be skeletonized: labels "
                  "must be integer IDs >= 0")


def _write(path: pathlib.Path, skeletons: list[Skeleton]) -> None:
  arrays = {
      "labels": np.array([s.label for s in skeletons], np.uint64),
      "node_counts": np.array([len(s.vertices_zyx) for s in skeletons], np.int64),
      "edge_counts": np.array([len(s.edges) for s in skeletons], np.int64),
      "vertices_zyx": np.concatenate([s.vertices_zyx for s in skeletons]).astype(np.float32)
                      if skeletons else np.zeros((0, 3), np.float32),
      "edges": np.concatenate([s.edges for s in skeletons]).astype(np.int64)
               if skeletons else np.zeros((0, 2), np.int64),
  }
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp made it 0600; other users of a shared cache may read it
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _read(path: pathlib.Path) -> list[Skeleton]:
  with np.load(path, allow_pickle=False) as f:
    labels, node_counts, edge_counts = f["labels"], f["node_counts"], f["edge_counts"]
    vertices, edges = f["vertices_zyx"], f["edges"]
  node_ends, edge_ends = np.cumsum(node_counts), np.cumsum(edge_counts)
  if (node_ends[-1:].sum() != len(vertices) or edge_ends[-1:].sum() != len(edges)
      or len(labels) != len(node_counts) or len(labels) != len(edge_counts)):
    raise ValueError(f"{path}: inconsistent skeleton cache entry")
  return [Skeleton(int(label), v, e) for label, v, e in
          zip(labels, np.split(vertices, node_ends[:-1]), np.split(edges, edge_ends[:-1]))]
