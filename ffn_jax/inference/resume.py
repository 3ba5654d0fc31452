"""Which job a workdir holds, and its resumable state.

A block's job is identified by what determines its segmentation (``identity``: image, bbox,
checkpoint, model, normalization, flood settings; not the batch size or intervals), recorded in
``job.json``. ``check_workdir`` then decides: an ``inference_state.npz`` of the same job ->
resume from it; a finished same job -> nothing to do; anything else already there -> refuse
(never overwrite a segmentation of a different job).
"""
from __future__ import annotations

import os

import numpy as np

from ffn_jax.errors import UserError
from ffn_jax.inference.outputs import COUNTERS, SEGMENTATION, read_json

STATE = "inference_state.npz"
JOB = "job.json"


def identity(config, image_desc: str, bbox, model, mean, sd, compute_dtype: str) -> dict:
  """What determines the segmentation (batch size, intervals etc. do not)."""
  return {
      "image": image_desc,
      "bbox_start_zyx": list(bbox[0]), "bbox_size_zyx": list(bbox[1]),
      "mask": str(config.get("mask", "")),
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


def check_workdir(workdir: str, job: dict) -> str:
  """'fresh', 'resume' or 'done'; raises if ``workdir`` holds another job's results."""
  job_path = os.path.join(workdir, JOB)
  same = os.path.exists(job_path) and read_json(job_path).get("identity") == job
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
  return os.path.exists(path) and bool(read_json(path).get("complete"))


def save_state(path: str, state: dict) -> None:
  tmp = path + ".tmp.npz"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **state)
  os.replace(tmp, path)


def load_state(path: str) -> dict:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001 - a truncated / foreign file
    raise UserError(f"cannot read inference state {path} ({type(e).__name__}: {e}); delete it "
                    "to start over") from None
