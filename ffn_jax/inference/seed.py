"""Seed policies: the ordered list of positions where new segments are attempted (host numpy).

``policy_peaks`` follows Google's ``PolicyPeaks``: Sobel gradient magnitude of the (normalized)
image, thresholded against its own Gaussian blur (sigma 49/6), Euclidean distance to the nearest
edge voxel (with voxel anisotropy as EDT sampling), then local maxima of that distance (plus a
fixed 1e-4 noise from numpy's legacy seed 42 to break ties) at least ``min_distance`` apart,
sorted ascending by (z, y, x). ``policy_grid`` is Google's ``PolicyGrid3d``.

Google's noise is drawn over the whole array, so a block of another shape breaks ties
differently at every voxel. Given ``origin_zyx`` (the array's position in the volume), the
policies are keyed to volume coordinates instead: the noise is a hash of each voxel's position
(``keyed_noise``) and the grid a lattice of the volume, so that any block that sees enough of the
image around a voxel (a halo) places the seeds there as a pass over a larger block would.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, spatial


def peak_local_max(image: np.ndarray, min_distance: int = 3, threshold_abs: float = 0.0,
                   threshold_rel: float = 0.0, exclude_border: int | None = None) -> np.ndarray:
  """Local maxima as in ``skimage.feature.peak_local_max`` (cube footprint, p = inf spacing).

  A voxel is a peak if it equals the maximum over the (2 * min_distance + 1)^3 cube around it
  (edges replicated) and exceeds the threshold; peaks within ``exclude_border`` (default
  ``min_distance``) of the border are dropped; among peaks closer than ``min_distance``
  (Chebyshev) only the brightest survives.

  Returns:
    int64 [N, ndim] coordinates, brightest first.
  """
  border = min_distance if exclude_border is None else exclude_border
  threshold = max(threshold_abs, threshold_rel * float(image.max()))
  size = 2 * min_distance + 1
  image_max = ndimage.maximum_filter(image, size=size, mode="nearest")
  peaks = image == image_max
  if np.all(peaks):  # a constant image has no peaks
    return np.zeros((0, image.ndim), np.int64)
  peaks &= image > threshold
  if border > 0:
    for axis in range(image.ndim):
      for edge in (slice(0, border), slice(-border, None)):
        index = [slice(None)] * image.ndim
        index[axis] = edge
        peaks[tuple(index)] = False
  coords = np.argwhere(peaks)
  order = np.argsort(-image[peaks], kind="stable")
  coords = coords[order]
  if len(coords) > 1 and min_distance > 0:
    coords = _ensure_spacing(coords, min_distance)
  return coords.astype(np.int64)


def _ensure_spacing(coords: np.ndarray, spacing: float) -> np.ndarray:
  """Greedy in the given order: drops points closer than ``spacing`` (Chebyshev) to a kept one."""
  tree = spatial.cKDTree(coords)
  neighbours = tree.query_ball_point(coords, r=spacing, p=np.inf)
  rejected = np.zeros(len(coords), bool)
  for i, cands in enumerate(neighbours):
    if rejected[i]:
      continue
    for j in cands:
      if j != i and np.max(np.abs(coords[j] - coords[i])) < spacing:
        rejected[j] = True
  return coords[~rejected]


def edge_distance(image: np.ndarray, mask: np.ndarray | None = None,
                  voxel_size_zyx=(1, 1, 1)) -> np.ndarray:
  """Distance (in voxel_size units) of every voxel to the nearest Sobel edge; float32."""
  edges = ndimage.generic_gradient_magnitude(image.astype(np.float32), ndimage.sobel)
  blurred = np.zeros(edges.shape, np.float32)
  ndimage.gaussian_filter(edges, 49.0 / 6.0, output=blurred, mode="reflect")
  edge_mask = edges > blurred
  del edges, blurred
  if mask is not None:  # masked areas count as edges, so they do not push seeds around
    edge_mask[mask] = True
  return ndimage.distance_transform_edt(
      ~edge_mask, sampling=tuple(float(v) for v in voxel_size_zyx)).astype(np.float32)


def keyed_noise(origin_zyx, shape_zyx) -> np.ndarray:
  """Uniform [0, 1) float64 noise over the block at ``origin_zyx`` (volume zyx) of ``shape_zyx``,
  a function of each voxel's volume position only (splitmix64 of the packed coordinates)."""
  with np.errstate(over="ignore"):
    axes = [(np.arange(n, dtype=np.int64) + int(o)).astype(np.uint64)
            for o, n in zip(origin_zyx, shape_zyx)]
    z, y, x = np.ix_(*axes)
    h = (z * np.uint64(0x9E3779B97F4A7C15)) ^ (y * np.uint64(0xC2B2AE3D27D4EB4F)) ^ (
        x * np.uint64(0x165667B19E3779F9))
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    h = h ^ (h >> np.uint64(31))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def policy_peaks(image: np.ndarray, mask: np.ndarray | None = None, voxel_size_zyx=(1, 1, 1),
                 min_distance: int = 3, origin_zyx=None) -> np.ndarray:
  """Google's PolicyPeaks seed list: int64 [N, 3] zyx, ascending lexicographic order.

  ``origin_zyx``: None breaks ties with Google's noise (seed 42, drawn over the array); else the
  array's volume position, and ties are broken by ``keyed_noise``."""
  dt = edge_distance(image, mask, voxel_size_zyx)
  if origin_zyx is None:
    # Same noise as np.random.seed(42); np.random.random(shape) without touching global state.
    noise = np.random.RandomState(42).random_sample(dt.shape) * 1e-4
  else:
    noise = keyed_noise(origin_zyx, dt.shape) * 1e-4
  peaks = peak_local_max(dt + noise, min_distance=min_distance, threshold_abs=0,
                         threshold_rel=0)
  if len(peaks) == 0:
    return np.zeros((0, 3), np.int64)
  order = np.lexsort((peaks[:, 2], peaks[:, 1], peaks[:, 0]))
  return peaks[order]


def policy_grid(shape_zyx, step: int = 16, offsets=(0, 8, 4, 12, 2, 10, 14),
                origin_zyx=None) -> np.ndarray:
  """Google's PolicyGrid3d: for each offset, the cubic lattice offset + k * step, z-major.

  ``origin_zyx``: the array's volume position, to take the volume's lattice (k >= 0 from the
  volume's origin) instead of the array's; coordinates stay the array's."""
  origin = np.zeros(3, np.int64) if origin_zyx is None else np.asarray(origin_zyx, np.int64)
  coords = []
  for off in offsets:
    # First lattice point >= max(0, off - origin) on each axis, in array coordinates.
    first = [max(-o + off, (off - o) % step) for o in origin]
    for z in range(first[0], shape_zyx[0], step):
      for y in range(first[1], shape_zyx[1], step):
        for x in range(first[2], shape_zyx[2], step):
          coords.append((z, y, x))
  return np.array(coords, np.int64).reshape(-1, 3)


class SeedList:
  """Iterates a seed list, skipping positions whose FOV would leave the canvas.

  The state is (coords, idx); ``idx`` is the index of the next coordinate to look at.
  """

  def __init__(self, coords: np.ndarray, shape_zyx, margin_zyx, idx: int = 0):
    self.coords = np.asarray(coords, np.int64).reshape(-1, 3)
    self.shape = np.asarray(shape_zyx)
    self.margin = np.asarray(margin_zyx)
    self.idx = int(idx)

  def __len__(self) -> int:
    return len(self.coords)

  def next(self):
    """Returns (index, (z, y, x)) of the next usable seed, or None when exhausted."""
    while self.idx < len(self.coords):
      i = self.idx
      pos = self.coords[i]
      self.idx += 1
      if np.all(pos - self.margin >= 0) and np.all(pos + self.margin < self.shape):
        return i, tuple(int(v) for v in pos)
    return None


def make_seed_coords(name: str, image: np.ndarray, mask: np.ndarray | None, voxel_size_zyx,
                     min_distance: int, grid_step: int, grid_offsets,
                     origin_zyx=None) -> np.ndarray:
  """Seed coordinates for the policy ``name`` (PolicyPeaks or PolicyGrid3d); ``origin_zyx``:
  key them to volume coordinates (see the module docstring)."""
  if name in ("PolicyPeaks", "peaks"):
    return policy_peaks(image, mask, voxel_size_zyx, min_distance, origin_zyx)
  if name in ("PolicyGrid3d", "grid"):
    return policy_grid(image.shape, grid_step, grid_offsets, origin_zyx)
  from ffn_jax.errors import UserError
  raise UserError(f"unknown seed_policy {name!r}; choose PolicyPeaks or PolicyGrid3d")
