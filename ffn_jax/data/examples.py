"""Recurrent FOV-move training examples, as FFN trains.

For each sampled coordinate a block of size ``fov + 2 * deltas * fov_moves`` is cut from the
image and labels (zyx), augmented, and turned into soft labels (0.95 for "same object as the
centre voxel", 0.05 otherwise) and an initial seed (logit(0.05), logit(0.95) at the centre). The
FOV then walks the ``fixed`` policy: the centre, then the 26 shifts of +-delta, skipping a shift
whose centre voxel in the current seed is below logit(move_threshold). After every training step
the model's output logits are written back into that example's seed (``update``), so the next
move sees them. Each batch slot advances its own example; a slot whose moves are exhausted starts
a new example.

The state (sampler position, per-slot example and seed, example counter) is a dict of numpy
arrays, checkpointed with the model, so resume is exact.

New examples do not depend on the model: example ``n`` is the sampler's ``n``-th coordinate and
a variant drawn from (seed, rank, n). With ``prefetch > 0`` a background thread cuts the next
``prefetch`` examples' blocks while the device computes, so that the loop only copies FOVs and
writes seeds back; the batches are bit-identical to ``prefetch=0``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import itertools

import numpy as np

from ffn_jax.data import augment
from ffn_jax.data.partitions import BalancedSampler
from ffn_jax.model import logit

LABEL_OFF, LABEL_ON = 0.05, 0.95


def fixed_policy_offsets(deltas_zyx, fov_moves: int = 1) -> np.ndarray:
  """The centre first, then every shift in {-d, 0, d}^3 (times 1..fov_moves), zyx."""
  offsets = [(0, 0, 0)]
  for m in range(1, fov_moves + 1):
    for dz, dy, dx in itertools.product((-1, 0, 1), repeat=3):
      if (dz, dy, dx) != (0, 0, 0):
        offsets.append((dz * deltas_zyx[0] * m, dy * deltas_zyx[1] * m, dx * deltas_zyx[2] * m))
  return np.asarray(offsets, np.int32)


class RecurrentExamples:
  """Batches of (image, seed, labels) FOVs whose seeds carry the model's own predictions.

  Args:
    image_ZYX: float32 normalized image of the training region.
    labels_ZYX: integer labels of the same region.
    sampler: class-balanced coordinate sampler (this rank's shard).
    batch_size: slots per batch (all local devices together).
    fov_size_zyx, deltas_zyx, fov_moves, move_threshold: FFN training geometry.
    augment_data: random reflections/transposes per example.
    seed, rank: determinism of augmentation.
    prefetch: new examples prepared ahead in a background thread (0: none, all on demand).
  """

  def __init__(self, image_ZYX, labels_ZYX, sampler: BalancedSampler, batch_size: int,
               fov_size_zyx, deltas_zyx, fov_moves: int = 1, move_threshold: float = 0.9,
               augment_data: bool = True, seed: int = 0, rank: int = 0, prefetch: int = 0):
    self.image, self.labels, self.sampler = image_ZYX, labels_ZYX, sampler
    self.batch_size = int(batch_size)
    self.fov = np.asarray(fov_size_zyx, int)
    self.offsets = fixed_policy_offsets(deltas_zyx, fov_moves)
    self.block = self.fov + 2 * np.asarray(deltas_zyx, int) * fov_moves
    self.move_threshold_logit = logit(move_threshold)
    self.augment_data, self.seed, self.rank = augment_data, int(seed), int(rank)
    b, blk = self.batch_size, tuple(self.block)
    self.slot_seed = np.zeros((b, *blk), np.float32)
    self.slot_coord = np.zeros((b, 3), np.int32)
    self.slot_variant = np.zeros((b,), np.int32)
    self.slot_next_offset = np.full((b,), len(self.offsets), np.int32)  # exhausted -> new example
    self.slot_pos = np.zeros((b, 3), np.int32)  # FOV centre within the block of the last batch
    self.examples_started = 0
    self._image_block = [None] * b
    self._label_block = [None] * b
    self.prefetch = int(prefetch)
    self._ahead = None  # _Prefetcher, started on the first new example

  # -- examples -------------------------------------------------------------------------------
  def _variant(self, n: int) -> int:
    rng = np.random.default_rng([self.seed, self.rank, n])
    return int(rng.integers(augment.NUM_VARIANTS)) if self.augment_data else 0

  def _blocks(self, centre, variant: int):
    """(image block, soft-label block) of an example, augmented, C-contiguous float32."""
    start = np.asarray(centre) - self.block // 2
    sl = tuple(slice(a, a + n) for a, n in zip(start, self.block))
    soft = np.where(self.labels[sl] == self.labels[tuple(centre)], np.float32(LABEL_ON),
                    np.float32(LABEL_OFF))
    return (np.ascontiguousarray(augment.apply(self.image[sl], variant)),
            np.ascontiguousarray(augment.apply(soft, variant)))

  def _load_blocks(self, slot: int) -> None:
    self._image_block[slot], self._label_block[slot] = self._blocks(
        self.slot_coord[slot], int(self.slot_variant[slot]))

  def _start_example(self, slot: int) -> None:
    n = self.examples_started
    if self.prefetch > 0:
      if self._ahead is None:
        self._ahead = _Prefetcher(self, self.prefetch)
      coord, variant, blocks, sampler_state = self._ahead.take(n)
      self.sampler.restore(sampler_state)  # the checkpointed position, as if drawn here
    else:
      coord = self.sampler.next()
      variant = self._variant(n)
      blocks = self._blocks(coord, variant)
    self.slot_coord[slot], self.slot_variant[slot] = coord, variant
    self._image_block[slot], self._label_block[slot] = blocks
    self.examples_started += 1
    self.slot_seed[slot] = logit(LABEL_OFF)
    self.slot_seed[(slot, *(self.block // 2))] = logit(LABEL_ON)
    self.slot_next_offset[slot] = 0

  def _advance(self, slot: int) -> np.ndarray:
    """Next valid FOV centre (block coordinates) of this slot, starting examples as needed."""
    n = len(self.offsets)
    while True:
      i = int(self.slot_next_offset[slot])
      if i >= n:
        self._start_example(slot)
        continue
      # The seed does not change until the next update: test all remaining moves at once.
      pos = self.block // 2 + self.offsets[i:]
      ok = self.slot_seed[slot][pos[:, 0], pos[:, 1], pos[:, 2]] >= self.move_threshold_logit
      hits = np.flatnonzero(ok)
      if hits.size == 0:
        self.slot_next_offset[slot] = n
        continue
      self.slot_next_offset[slot] = i + hits[0] + 1
      return pos[hits[0]]

  # -- batches --------------------------------------------------------------------------------
  def next_batch(self) -> dict:
    """Returns {'image', 'seed', 'labels'}: float32 [B, z, y, x, 1] FOVs."""
    b, fov = self.batch_size, tuple(self.fov)
    out = {k: np.empty((b, *fov, 1), np.float32) for k in ("image", "seed", "labels")}
    for slot in range(b):
      if self._image_block[slot] is None and self.slot_next_offset[slot] < len(self.offsets):
        self._load_blocks(slot)  # after a restore
      pos = self._advance(slot)
      self.slot_pos[slot] = pos
      sl = self._fov_slice(pos)
      out["image"][slot, ..., 0] = self._image_block[slot][sl]
      out["seed"][slot, ..., 0] = self.slot_seed[slot][sl]
      out["labels"][slot, ..., 0] = self._label_block[slot][sl]
    return out

  def _fov_slice(self, pos):
    start = np.asarray(pos) - self.fov // 2
    return tuple(slice(a, a + n) for a, n in zip(start, self.fov))

  def update(self, logits_BZYX1: np.ndarray) -> None:
    """Writes the model's output for the last batch back into each slot's seed."""
    logits = np.asarray(logits_BZYX1, np.float32)
    for slot in range(self.batch_size):
      self.slot_seed[slot][self._fov_slice(self.slot_pos[slot])] = logits[slot, ..., 0]

  # -- state ----------------------------------------------------------------------------------
  def state(self) -> dict:
    s = self.sampler.state()
    return {
        "sampler_epoch": np.int64(s["epoch"]), "sampler_pos": np.int64(s["pos"]),
        "examples_started": np.int64(self.examples_started),
        "slot_seed": self.slot_seed.copy(), "slot_coord": self.slot_coord.copy(),
        "slot_variant": self.slot_variant.copy(),
        "slot_next_offset": self.slot_next_offset.copy(), "slot_pos": self.slot_pos.copy(),
    }

  def restore(self, state: dict) -> None:
    self.sampler.restore({"epoch": state["sampler_epoch"], "pos": state["sampler_pos"]})
    self.examples_started = int(state["examples_started"])
    for key in ("slot_seed", "slot_coord", "slot_variant", "slot_next_offset", "slot_pos"):
      value = np.asarray(state[key])
      if value.shape != getattr(self, key).shape:
        raise ValueError(f"data state {key} has shape {value.shape}, "
                         f"expected {getattr(self, key).shape}")
      setattr(self, key, value.astype(getattr(self, key).dtype).copy())
    self._image_block = [None] * self.batch_size
    self._label_block = [None] * self.batch_size
    self.close()  # examples prepared ahead came from the old sampler position

  def close(self) -> None:
    """Stops the prefetch thread (a later new example starts it again)."""
    if self._ahead is not None:
      self._ahead.close()
      self._ahead = None


class _Prefetcher:
  """Examples ``n, n+1, ...`` (coordinate, variant, blocks), each cut in one background thread.

  It draws from its own copy of the sampler, taken at the owner's current position, so the
  owner's sampler (whose state is checkpointed) only moves as examples are used.
  """

  def __init__(self, owner: RecurrentExamples, depth: int):
    self.owner, self.depth = owner, depth
    self.sampler = copy.copy(owner.sampler)
    self.next_n = owner.examples_started
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ffn-examples")
    self.queue = collections.deque()
    self._fill()

  def _make(self, n: int):
    coord = self.sampler.next()  # in order: one worker thread runs the tasks
    state = self.sampler.state()
    owner = self.owner
    variant = owner._variant(n)  # pylint: disable=protected-access
    return n, coord, variant, owner._blocks(coord, variant), state  # pylint: disable=protected-access

  def _fill(self) -> None:
    while len(self.queue) < self.depth:
      self.queue.append(self.pool.submit(self._make, self.next_n))
      self.next_n += 1

  def take(self, n: int):
    made, *example = self.queue.popleft().result()
    if made != n:
      raise RuntimeError(f"prefetched example {made} where example {n} was expected")
    self._fill()
    return example

  def close(self) -> None:
    for future in self.queue:
      future.cancel()
    self.pool.shutdown(wait=True)
