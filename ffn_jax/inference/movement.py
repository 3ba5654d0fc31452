"""Face-max movement policy: where the FOV of one segment goes next (host-side numpy).

Google's ``FaceMaxMovementPolicy``: after a prediction at ``pos``, look at the 6 faces of the cube
at +-delta around the FOV centre, take the maximum logit on each face and enqueue that voxel if it
reaches the move threshold. The queue is FIFO; moves found by one prediction are enqueued in
descending (score, offset) order. A popped position is skipped if its quantized cell (a lattice
of ``deltas`` centred on the segment's start) was already visited or the canvas says it is not a
valid position (seed below threshold, too close to the border, already segmented).
"""
from __future__ import annotations

import collections
from typing import Callable

import numpy as np


def face_max_moves(logits_ZYX: np.ndarray, deltas_zyx, threshold: float):
  """Candidate moves from one prediction, in the order Google enqueues them.

  Args:
    logits_ZYX: predicted object map (logits) of the FOV, odd size, centre = FOV centre.
    deltas_zyx: move step per axis; an axis with delta 0 is never moved along.
    threshold: minimum face maximum (logit) for a move; compared in float64 as Google does.

  Returns:
    list of (score, offset_zyx) sorted descending; offsets are relative to the FOV centre.
  """
  center = np.array(logits_ZYX.shape) // 2
  box = [slice(c - d, c + d + 1) for c, d in zip(center, deltas_zyx)]
  found = {}
  for axis, delta in enumerate(deltas_zyx):
    if delta == 0:
      continue
    for offset in (-delta, delta):
      face_sel = list(box)
      face_sel[axis] = center[axis] + offset
      face = logits_ZYX[tuple(face_sel)]
      fy, fx = np.unravel_index(int(np.argmax(face)), face.shape)
      score = float(face[fy, fx])
      if score < threshold:
        continue
      rel = [int(fy) - face.shape[0] // 2, int(fx) - face.shape[1] // 2]
      rel.insert(axis, int(offset))
      found[(score, tuple(rel))] = None  # an edge voxel shared by two faces counts once
  return sorted(found, reverse=True)


class FaceMaxPolicy:
  """The FIFO move queue of one segment plus its set of visited lattice cells."""

  def __init__(self, deltas_zyx, score_threshold: float):
    self.deltas = np.asarray(deltas_zyx, np.int64)
    self.score_threshold = float(score_threshold)
    self.queue: collections.deque = collections.deque()
    self.visited: set = set()
    self.start = np.zeros(3, np.int64)

  def reset(self, start_zyx) -> None:
    """Starts a new segment at ``start_zyx`` (one position, or [N, 3] positions queued in that
    order; the lattice is centred on the first)."""
    starts = np.asarray(start_zyx, np.int64).reshape(-1, 3)
    self.queue = collections.deque((2.0 * self.score_threshold, tuple(int(v) for v in p))
                                   for p in starts)
    self.visited = set()
    self.start = starts[0]

  def quantize(self, pos_zyx) -> tuple:
    """Lattice cell of ``pos``; the start lies in the middle of cell (0, 0, 0)."""
    rel = np.asarray(pos_zyx, np.int64) - self.start
    return tuple(int(v) for v in (rel + self.deltas // 2) // np.maximum(self.deltas, 1))

  def peek(self):
    """The position at the head of the queue (not checked), or None."""
    return self.queue[0][1] if self.queue else None

  def pop(self, is_valid: Callable[[tuple], bool]):
    """Pops until a position in an unvisited cell passes ``is_valid``; None when exhausted."""
    while self.queue:
      _, pos = self.queue.popleft()
      if self.quantize(pos) in self.visited:
        continue
      if is_valid(pos):
        return pos
    return None

  def update(self, logits_ZYX: np.ndarray, pos_zyx) -> None:
    """Marks ``pos`` visited and enqueues the face-max moves of the prediction made there."""
    self.visited.add(self.quantize(pos_zyx))
    for score, rel in face_max_moves(logits_ZYX, self.deltas, self.score_threshold):
      self.queue.append((score, tuple(int(p) + r for p, r in zip(pos_zyx, rel))))

  # Checkpointing: plain arrays only (np.savez with allow_pickle=False).
  def get_state(self) -> dict:
    scores = np.array([s for s, _ in self.queue], np.float64)
    coords = np.array([c for _, c in self.queue], np.int64).reshape(-1, 3)
    visited = np.array(sorted(self.visited), np.int64).reshape(-1, 3)
    return {"queue_scores": scores, "queue_zyx": coords, "visited": visited, "start": self.start}

  def set_state(self, state: dict) -> None:
    self.start = np.asarray(state["start"], np.int64)
    self.queue = collections.deque(
        (float(s), tuple(int(v) for v in c))
        for s, c in zip(state["queue_scores"], state["queue_zyx"]))
    self.visited = {tuple(int(v) for v in c) for c in state["visited"]}
