"""Overlapping tiles of a volume box, and stitching their segmentations into global IDs (pure).

A box is cut along each axis into tiles of ``tile_size`` that overlap their neighbours by at least
``overlap`` voxels; the last tile on an axis is aligned with the box's end (its overlap with the
one before may be larger). Every tile also has a *core*: the tiles' cores split each overlap in
the middle, so they partition the box and every output voxel comes from exactly one tile.

Stitching rule: two tiles' segments ``a`` and ``b`` are the same object when, inside the region
where the two tiles are compared, they share at least ``min_overlap_voxels`` voxels and that
shared part is at least ``min_fraction`` of ``a``'s voxels in the region *and* of ``b``'s. The
region is the tiles' overlap less ``margin`` voxels next to every tile edge that lies inside the
box (``match_region``): a FOV cannot be centred within half its size of a tile's edge, so each
tile segments the voxels next to its own edges worst, and neighbouring tiles disagree most there.
With ``min_fraction > 0.5`` a segment can match at most one segment of the other tile, so one
tile pair never chains distinct objects together. The matches of all tile pairs (faces, edges and
corners) are joined with union-find (connected components), and the objects get consecutive
global IDs in the order of tiles, then local IDs.

Continuation (``rounds``, ``priors``): the tiles are segmented in two rounds, a checkerboard of
even and odd index sums, so that every face neighbour of a second-round tile is a first-round
one. A second-round tile starts from the labels of its first-round neighbours in *their cores*
(renumbered 1..P, with links back to the neighbour's IDs) and continues those objects into
itself; the links join the two tiles' IDs directly, besides the rule. An object that enters a
tile through two faces is continued from the first; that flood covers its prior voxels on the
second face without relabelling them, and ``joins`` makes the two labels one object when the
flood covered at least ``join_fraction`` of the second one's voxels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from ffn_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tile:
  """One tile: its box and its core, in volume coordinates (zyx)."""
  index: tuple[int, int, int]
  start: tuple[int, int, int]
  size: tuple[int, int, int]
  core_start: tuple[int, int, int]
  core_size: tuple[int, int, int]

  @property
  def name(self) -> str:
    return "z{}_y{}_x{}".format(*self.index)

  @property
  def stop(self) -> tuple[int, int, int]:
    return tuple(a + s for a, s in zip(self.start, self.size))

  def core(self) -> "Tile":
    """This tile's core as a tile of its own (for ``intersection``)."""
    return Tile(self.index, self.core_start, self.core_size, self.core_start, self.core_size)

  def to_json(self) -> dict:
    return {k: list(v) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_json(cls, d: dict) -> "Tile":
    return cls(**{k: tuple(v) for k, v in d.items()})


def _axis(start: int, size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
  """(tile start, tile size, core start, core size) along one axis."""
  if size <= tile:
    return [(start, size, start, size)]
  stride = tile - overlap
  n = math.ceil((size - overlap) / stride)
  starts = [start + i * stride for i in range(n - 1)] + [start + size - tile]
  stops = [s + tile for s in starts]
  # Core boundaries: the middle of each overlap.
  cuts = [start] + [(starts[i + 1] + stops[i]) // 2 for i in range(n - 1)] + [start + size]
  return [(s, tile, cuts[i], cuts[i + 1] - cuts[i]) for i, s in enumerate(starts)]


def plan(box_start, box_size, tile_size, overlap) -> list[Tile]:
  """The tiles of a box, in zyx raster order.

  Raises:
    UserError: sizes that are not three positive integers, or an overlap not below the tile
      size (and not below half a tile: the cores must be non-empty).
  """
  box_start, box_size = tuple(map(int, box_start)), tuple(map(int, box_size))
  tile_size, overlap = tuple(map(int, tile_size)), tuple(map(int, overlap))
  if len(tile_size) != 3 or len(overlap) != 3:
    raise UserError(f"tile_size_zyx {tile_size} and tile_overlap_zyx {overlap} need three "
                    "values (z, y, x)")
  if any(t <= 0 for t in tile_size):
    raise UserError(f"tile_size_zyx {tile_size} must be positive along every axis")
  if any(o < 0 or 2 * o >= t for o, t in zip(overlap, tile_size)):
    raise UserError(f"tile_overlap_zyx {overlap} must be >= 0 and below half of tile_size_zyx "
                    f"{tile_size} along every axis")
  axes = [_axis(a, s, t, o) for a, s, t, o in zip(box_start, box_size, tile_size, overlap)]
  tiles = []
  for iz, z in enumerate(axes[0]):
    for iy, y in enumerate(axes[1]):
      for ix, x in enumerate(axes[2]):
        parts = (z, y, x)
        tiles.append(Tile((iz, iy, ix), tuple(p[0] for p in parts), tuple(p[1] for p in parts),
                          tuple(p[2] for p in parts), tuple(p[3] for p in parts)))
  return tiles


def intersection(a: Tile, b: Tile):
  """(start, size) of the overlap of two tiles' boxes, or None."""
  start = tuple(max(p, q) for p, q in zip(a.start, b.start))
  stop = tuple(min(p, q) for p, q in zip(a.stop, b.stop))
  if any(e <= s for s, e in zip(start, stop)):
    return None
  return start, tuple(e - s for s, e in zip(start, stop))


def match_region(a: Tile, b: Tile, box_start, box_size, margin: int = 0):
  """(start, size) of the region where tiles ``a`` and ``b`` are compared, or None: their
  overlap, less ``margin`` voxels next to each edge of either tile that lies inside the box
  (an edge on the box's own boundary has no neighbour and stays)."""
  region = intersection(a, b)
  if region is None:
    return None
  box_stop = [s + n for s, n in zip(box_start, box_size)]
  lo, hi = list(region[0]), [s + n for s, n in zip(*region)]
  for t in (a, b):
    for d in range(3):
      if t.start[d] > box_start[d]:
        lo[d] = max(lo[d], t.start[d] + margin)
      if t.stop[d] < box_stop[d]:
        hi[d] = min(hi[d], t.stop[d] - margin)
  if any(h <= l for l, h in zip(lo, hi)):
    return None
  return tuple(lo), tuple(h - l for l, h in zip(lo, hi))


def find_merges(tiles, read, box_start, box_size, min_overlap_voxels: int, min_fraction: float,
                margin: int = 0) -> list[tuple[int, int, int, int]]:
  """(tile i, local a, tile j, local b) for every pair of segments of overlapping tiles that
  the rule (module docstring) calls one object; ``read(k, start, size)`` returns tile ``k``'s
  local labels in a box given in volume coordinates."""
  merges = []
  for i in range(len(tiles)):
    for j in range(i + 1, len(tiles)):
      region = match_region(tiles[i], tiles[j], box_start, box_size, margin)
      if region is None:
        continue
      for a, b, _ in match(read(i, *region), read(j, *region), min_overlap_voxels,
                           min_fraction):
        merges.append((i, a, j, b))
  return merges


def rounds(tiles) -> list[list[int]]:
  """Tile indices in segmenting rounds for continuation: even index sum, then odd (empty
  rounds left out)."""
  parity = [sum(t.index) % 2 for t in tiles]
  return [r for r in ([k for k, p in enumerate(parity) if p == 0],
                      [k for k, p in enumerate(parity) if p == 1]) if r]


def priors(tiles, k: int, sources, read) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """What tile ``k`` starts from: the labels of tiles ``sources`` in their cores inside tile
  ``k``'s box, renumbered 1..P in the order of sources, then IDs.

  Returns:
    (int32 labels of tile ``k``'s shape, [(source tile, its local ID)] for labels 1..P).
  """
  tile = tiles[k]
  prior = np.zeros(tile.size, np.int32)
  links: list[tuple[int, int]] = []
  for i in sources:
    region = intersection(tiles[i].core(), tile)
    if i == k or region is None:
      continue
    labels = read(i, *region).astype(np.int64)
    ids = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(len(links) + 1, len(links) + len(ids) + 1, dtype=np.int32)
    prior[tuple(slice(a - b, a - b + n) for a, b, n in zip(region[0], tile.start, region[1]))] = (
        lut[labels])
    links += [(i, int(a)) for a in ids]
  return prior, links


def joins(overlaps: dict, n_prior: int, prior_sizes, sizes, min_voxels: int,
          min_fraction: float) -> list[tuple[int, int]]:
  """(segment, prior label) pairs of one continued tile that are one object: the segment's
  flood covered at least ``min_voxels`` voxels and ``min_fraction`` of the prior object's voxels
  as they were when the segment was committed.

  Args:
    overlaps: segment ID -> {earlier label: voxels its flood covered} (``segments.json``).
    n_prior: prior labels are 1..n_prior, continued in that order before any new segment.
    prior_sizes, sizes: voxels per label at the start and in the finished tile (a label's
      voxels do not change after its own commit).
  """
  out = []
  for sid, covered in overlaps.items():
    for k, n in covered.items():
      if not 0 < k <= n_prior or k == sid or n < min_voxels:
        continue
      total = sizes[k] if k < sid else prior_sizes[k]  # committed before the segment or not
      if n >= min_fraction * total:
        out.append((int(sid), int(k)))
  return out


class Stitch(NamedTuple):
  tables: list  # per tile: uint64 local ID -> global ID (0: unlabelled, or not in the output)
  segments: int  # global IDs
  merges: list  # (tile i, local a, tile j, local b)
  tile_segments: int  # local IDs present in their tile's core, over all tiles


def stitch_tables(tiles, read, box_start, box_size, min_overlap_voxels: int, min_fraction: float,
                  margin: int = 0, links=()) -> Stitch:
  """The whole stitch short of writing the volume. ``read`` as in ``find_merges``; each tile is
  read whole once for its IDs. ``links``: (tile j, local b, tile i, local a) pairs joined
  whatever the rule says (continued prior objects and their origins)."""
  max_ids, present = [], []
  for k, t in enumerate(tiles):
    whole = read(k, t.start, t.size)
    core = whole[tuple(slice(a - b, a - b + n)
                       for a, b, n in zip(t.core_start, t.start, t.core_size))]
    max_ids.append(int(whole.max(initial=0)))
    present.append(np.unique(core[core > 0]))
  merges = find_merges(tiles, read, box_start, box_size, min_overlap_voxels, min_fraction, margin)
  tables, n = global_ids(max_ids, merges + list(links), present)
  return Stitch(tables, n, merges, int(sum(len(p) for p in present)))


def cores(tiles, tables, read):
  """(core start, the core's global IDs) per tile, in volume coordinates: the stitched volume,
  piece by piece (``tables`` from ``stitch_tables``, ``read`` as in ``find_merges``)."""
  for k, t in enumerate(tiles):
    yield t.core_start, tables[k][read(k, t.core_start, t.core_size)]


def match(seg_a: np.ndarray, seg_b: np.ndarray, min_overlap_voxels: int,
          min_fraction: float) -> list[tuple[int, int, int]]:
  """Pairs (a, b, shared voxels) of two tiles' labels over their common region that agree
  strongly enough (module docstring). 0 is unlabelled and never matches."""
  a = seg_a.ravel().astype(np.int64)
  b = seg_b.ravel().astype(np.int64)
  ids_a, inv_a, size_a = np.unique(a, return_inverse=True, return_counts=True)
  ids_b, inv_b, size_b = np.unique(b, return_inverse=True, return_counts=True)
  both = (a > 0) & (b > 0)
  pair = inv_a[both] * len(ids_b) + inv_b[both]
  keys, shared = np.unique(pair, return_counts=True)
  ia, ib = keys // len(ids_b), keys % len(ids_b)
  ok = ((shared >= min_overlap_voxels) & (shared >= min_fraction * size_a[ia])
        & (shared >= min_fraction * size_b[ib]))
  return [(int(ids_a[i]), int(ids_b[j]), int(n)) for i, j, n in zip(ia[ok], ib[ok], shared[ok])]


def global_ids(max_ids: list[int], merges: list[tuple[int, int, int, int]],
               present: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
  """Lookup tables local ID -> global ID for each tile.

  Args:
    max_ids: each tile's largest local ID.
    merges: (tile i, local a, tile j, local b) pairs to join.
    present: each tile's local IDs (> 0) that appear in the output (in its core).

  Returns:
    (one uint64 table per tile, indexed by local ID, with 0 -> 0 and IDs that appear nowhere in
    the output -> 0; the number of global IDs). Global IDs are 1..N in the order of first
    appearance: tile order, then local ID.
  """
  offsets = np.concatenate([[0], np.cumsum(np.asarray(max_ids, np.int64))])
  total = int(offsets[-1])
  rows = np.array([offsets[i] + a - 1 for i, a, _, _ in merges], np.int64)
  cols = np.array([offsets[j] + b - 1 for _, _, j, b in merges], np.int64)
  graph = sparse.coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(total, total))
  _, component = csgraph.connected_components(graph, directed=False)
  used = np.concatenate([offsets[k] + np.unique(np.asarray(p, np.int64)) - 1
                         for k, p in enumerate(present)] + [np.zeros(0, np.int64)])
  comps = component[used]
  unique, first = np.unique(comps, return_index=True)
  new_id = np.zeros(int(component.max(initial=-1)) + 1, np.uint64)
  new_id[unique[np.argsort(first)]] = np.arange(1, len(unique) + 1, dtype=np.uint64)
  table = np.zeros(total, np.uint64)
  # Every local ID of an object that reaches the output maps to its global ID.
  reached = np.zeros(len(new_id), bool)
  reached[comps] = True
  table[reached[component]] = new_id[component[reached[component]]]
  tables = [np.concatenate([[0], table[offsets[k]:offsets[k + 1]]]).astype(np.uint64)
            for k in range(len(max_ids))]
  return tables, len(unique)
