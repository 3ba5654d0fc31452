"""A canvas's resumable state as plain arrays (``np.savez``; read back with allow_pickle=False),
and its restore."""
from __future__ import annotations

import json

import numpy as np

from ffn_jax.inference.segment import Segment

STATE_VERSION = 1


def state_dict(canvas) -> dict:
  """Everything needed to resume, as plain arrays (for np.savez, allow_pickle=False).

  The head segment (the oldest in flight) is saved with its object map and queue; later,
  speculative ones are not: the candidates (continuations of prior labels, then seeds) resume
  right after the head and redo them. Prior labels are saved with the state; their
  continuations are derived from them again.
  """
  ids = sorted(canvas.origins)
  ov_sid, ov_id, ov_cnt = [], [], []
  for sid in ids:
    o_ids, o_counts = canvas.overlaps.get(sid, ((), ()))
    ov_sid += [sid] * len(o_ids)
    ov_id += list(o_ids)
    ov_cnt += list(o_counts)
  st = {
      "version": np.int64(STATE_VERSION),
      "segmentation": canvas.segmentation,
      "max_id": np.int64(canvas.max_id),
      "seed_coords": canvas.seeds.coords,
      "origin_ids": np.array(ids, np.int64),
      "origin_zyx": np.array([canvas.origins[i][0] for i in ids], np.int64).reshape(-1, 3),
      "origin_iters": np.array([canvas.origins[i][1] for i in ids], np.int64),
      "origin_sizes": np.array([canvas.origins[i][2] for i in ids], np.int64),
      "overlap_sid": np.array(ov_sid, np.int64),
      "overlap_id": np.array(ov_id, np.int64),
      "overlap_count": np.array(ov_cnt, np.int64),
      "counters_json": np.array(json.dumps(canvas.counters)),
  }
  n = len(canvas.continuations)
  head = canvas.jobs[0] if canvas.jobs else None
  if head is None:
    cont_idx, seed_idx = canvas.cont_idx, canvas.seeds.idx
  else:  # candidates: continuations 0..n-1, then seeds (cand_idx + n)
    nxt = head.cand_idx + n + (1 if head.iters > 0 else 0)
    cont_idx, seed_idx = min(nxt, n), max(nxt - n, 0)
    if head.iters > 0:
      st.update({f"head_{k}": v for k, v in head.get_state().items()})
  st["seed_idx"] = np.int64(seed_idx)
  st["cont_idx"] = np.int64(cont_idx)
  if canvas.prior is not None:
    st["prior"] = canvas.prior
  return st


def load_state(canvas, st: dict) -> None:
  """Restores ``state_dict(canvas)`` output into ``canvas`` (seed list included)."""
  if int(st["version"]) != STATE_VERSION:
    raise ValueError(f"inference state version {int(st['version'])} != {STATE_VERSION}")
  if tuple(st["segmentation"].shape) != canvas.shape:
    raise ValueError(f"saved segmentation shape {st['segmentation'].shape} != {canvas.shape}")
  if "prior" in st:
    canvas.set_prior(st["prior"])
    canvas.cont_idx = int(st["cont_idx"])
  canvas.segmentation = np.array(st["segmentation"], np.int32)
  canvas.max_id = int(st["max_id"])
  canvas.origins = {int(i): (tuple(int(v) for v in z), int(n), int(s)) for i, z, n, s in zip(
      st["origin_ids"], st["origin_zyx"], st["origin_iters"], st["origin_sizes"])}
  canvas.overlaps = {i: (np.zeros(0, np.int64), np.zeros(0, np.int64)) for i in canvas.origins}
  for sid in canvas.origins:
    sel = st["overlap_sid"] == sid
    canvas.overlaps[sid] = (st["overlap_id"][sel].astype(np.int64),
                          st["overlap_count"][sel].astype(np.int64))
  canvas.counters = json.loads(str(st["counters_json"]))
  canvas.set_seeds(st["seed_coords"], int(st["seed_idx"]))
  for job in canvas.jobs:
    job.release()
  canvas.jobs = []
  if "head_seed" in st:
    head = {k[len("head_"):]: v for k, v in st.items() if k.startswith("head_")}
    job = Segment(int(head["cand_idx"]), head["start"], canvas, int(head.get("label", 0)))
    job.set_state(head)
    canvas.jobs.append(job)
