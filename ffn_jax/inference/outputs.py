"""What a finished block writes into its workdir: ``segmentation.zarr`` (with its offset, voxel
size and provenance), ``segments.json``, ``preview.png`` and ``counters.json``; and the small
JSON helpers every inference file uses (written atomically)."""
from __future__ import annotations

import json
import os

import numpy as np

from ffn_jax.data import volumes
from ffn_jax.inference import preview

SEGMENTATION = "segmentation.zarr"
COUNTERS = "counters.json"
SEGMENTS = "segments.json"


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


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


def write_block(workdir: str, identity: dict, seg: np.ndarray, canvas, bbox, canvas_lo,
                raw: np.ndarray, preview_slices: int) -> None:
  """The segmentation of block ``bbox`` (``seg``, cropped from ``canvas``, whose voxel 0 lies
  at ``bbox[0] - canvas_lo``), its segments' seeds (volume zyx), sizes and overlaps, and a
  preview of ``preview_slices`` z slices over ``raw`` (none if 0)."""
  out_dtype = np.uint32 if canvas.max_id < 2**32 else np.uint64
  volumes.write_zarr(os.path.join(workdir, SEGMENTATION), seg.astype(out_dtype),
                     attrs=segmentation_attrs(identity))
  segments = {str(sid): {"seed_zyx": [int(a + b - w) for a, b, w in
                                      zip(o[0], bbox[0], canvas_lo)],
                         "fov_iters": o[1], "voxels": o[2],
                         **({"continued": True} if sid <= canvas.n_prior else {}),
                         "overlaps": {str(int(i)): int(n) for i, n in zip(*canvas.overlaps[sid])}}
              for sid, o in sorted(canvas.origins.items())}
  write_json(os.path.join(workdir, SEGMENTS), segments)
  if preview_slices > 0:
    preview.write_preview(os.path.join(workdir, "preview.png"), raw, seg, preview_slices,
                          title=f"bbox {bbox[0]} + {bbox[1]}")
