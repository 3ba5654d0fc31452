"""``infer.py`` on one box: segment the configured block with a trained FFN checkpoint.

``run(config, workdir)`` opens the job (``job.InferenceJob.open``: checkpoint, image, settings,
conv route) and segments ``bbox_start_zyx`` + ``bbox_size_zyx`` with ``InferenceJob.segment``,
which writes into ``workdir``:

- ``segmentation.zarr``: zyx uint32 (uint64 if needed) segment IDs of the block, 0 = unlabelled;
  its ``.zattrs`` record ``offset_zyx`` (the block's start), ``voxel_size_zyx`` and provenance;
- ``counters.json``: fov_calls, wall_s, segments, voxels_labelled, per-stage times, ...;
- ``segments.json``: per segment its seed (global zyx), FOV iterations, size and overlaps;
- ``preview.png``: a few z slices with the segmentation over the image;
- ``job.json``: what was asked (identifies the job; used to allow resuming);
- ``inference_state.npz`` while running: the periodic checkpoint (removed when done).

Resume order (``resume``): an existing ``inference_state.npz`` of the same job -> continue from
it; a finished same job -> report and leave it; anything else already in ``workdir`` -> refuse
(never overwrite a segmentation from a different job).
"""
from __future__ import annotations

from ffn_jax.inference import job as job_lib
from ffn_jax.inference import outputs

SEGMENTATION = outputs.SEGMENTATION


def run(config, workdir: str, predict_fn=None, explicit=()) -> dict:
  """Segments the configured block; returns the counters (also written to counters.json).

  ``predict_fn``: a replacement for the jitted FFN (same call signature), for tests.
  ``explicit``: the config keys the command line set (they win over calibrated settings).
  """
  job = job_lib.InferenceJob.open(config, predict_fn=predict_fn, explicit=explicit)
  return job.segment(job.bbox(), workdir).counters
