"""Synthetic EM-like volumes with dense ground truth, deterministic from a seed.

Neurite-like objects: smooth random-walk centrelines split space into tube-shaped territories
(each voxel belongs to its nearest centreline); territories touch at thin dark membranes; the
image is blurred and noisy like FIB-SEM. Labels are uint32, 1..N, no background.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def _centrelines(shape_zyx, n_objects: int, rng: np.random.Generator) -> np.ndarray:
  """Rasterised random-walk polylines; voxel value = object id (0 elsewhere)."""
  shape = np.asarray(shape_zyx)
  seeds = np.zeros(shape_zyx, np.uint32)
  steps = int(2 * shape.max())
  for obj in range(1, n_objects + 1):
    pos = rng.uniform(0, shape - 1)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    for _ in range(steps):
      direction += 0.25 * rng.normal(size=3)
      direction /= np.linalg.norm(direction)
      pos = pos + direction
      if np.any(pos < 0) or np.any(pos > shape - 1):
        break
      seeds[tuple(np.round(pos).astype(int))] = obj
  return seeds


def make_volume(shape_zyx=(64, 96, 96), n_objects: int = 24, seed: int = 0,
                noise_sd: float = 12.0, blur_sigma: float = 0.8):
  """Generates (image uint8 [z,y,x], labels uint32 [z,y,x])."""
  rng = np.random.default_rng(seed)
  seeds = _centrelines(shape_zyx, n_objects, rng)
  # Nearest centreline voxel for every voxel (EDT of the complement with indices).
  _, idx = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
  labels = seeds[tuple(idx)]
  # Renumber to 1..N (some walks may have left no voxel).
  ids, labels = np.unique(labels, return_inverse=True)
  labels = labels.reshape(shape_zyx).astype(np.uint32) + (1 if ids[0] != 0 else 0)
  membrane = np.zeros(shape_zyx, bool)
  for axis in range(3):
    diff = np.diff(labels, axis=axis) != 0
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis] = slice(0, -1)
    hi[axis] = slice(1, None)
    membrane[tuple(lo)] |= diff
    membrane[tuple(hi)] |= diff
  object_tone = rng.uniform(150, 200, size=labels.max() + 1)
  image = object_tone[labels]
  image = np.where(membrane, 50.0, image)
  image = ndimage.gaussian_filter(image, blur_sigma)
  image += rng.normal(scale=noise_sd, size=shape_zyx)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), labels


def main(argv=None) -> None:
  """``python -m ffn_jax.data.synthetic --out DIR [--seed S] [--shape-zyx Z,Y,X] [--objects N]``:
  writes a synthetic volume as ``DIR/image.zarr`` and ``DIR/labels.zarr`` (zyx), e.g. a held-out
  volume to segment and score a model trained on another seed's."""
  import argparse
  import json
  import os

  from ffn_jax.data import volumes
  from ffn_jax.errors import UserError

  class Parser(argparse.ArgumentParser):
    def error(self, message):
      raise UserError(f"{message} (see --help)")

  p = Parser(prog="python -m ffn_jax.data.synthetic", description=main.__doc__.split("\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--shape-zyx", default="48,80,80")
  p.add_argument("--objects", type=int, default=16)
  args = p.parse_args(argv)
  try:
    shape = tuple(int(v) for v in args.shape_zyx.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 8 or args.objects < 1:
    raise UserError(f"--shape-zyx needs three sizes >= 8 and --objects >= 1, got "
                    f"{args.shape_zyx!r} and {args.objects}")
  for name in ("image.zarr", "labels.zarr"):
    if os.path.exists(os.path.join(args.out, name)):
      raise UserError(f"{os.path.join(args.out, name)} exists; choose another --out")
  image, labels = make_volume(shape, args.objects, args.seed)
  os.makedirs(args.out, exist_ok=True)
  volumes.write_zarr(os.path.join(args.out, "image.zarr"), image)
  volumes.write_zarr(os.path.join(args.out, "labels.zarr"), labels)
  print(json.dumps({"out": os.path.abspath(args.out), "shape_zyx": list(shape),
                    "objects": int(labels.max()), "seed": args.seed}))


if __name__ == "__main__":
  from ffn_jax.cli import clean_errors
  with clean_errors():
    main()
