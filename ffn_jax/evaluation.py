"""Segmentation quality against ground truth: variation of information and adapted Rand error.

Pure numpy. Every metric comes from the sparse contingency table n_ij (voxels with prediction ID i
and truth ID j), built by one ``np.unique`` over combined uint64 keys (about 2 s for 250^3).

Which voxels count, and what prediction ID 0 (unlabelled) means:

- ``truth_zero="ignore"`` (default): voxels with truth 0 are left out (boundary / unknown);
  ``"as-segment"``: truth 0 is an ordinary segment.
- ``pred_unlabelled="as-segment"`` (default): prediction 0 is one segment, so unlabelled voxels
  cost like one big merge; ``"ignore"``: voxels with prediction 0 are left out;
  ``"singletons"``: each voxel with prediction 0 is a segment of its own (as CREMI's adapted Rand
  error treats background; CREMI adds sum(c)/N for them where exact singletons give sum(c)).

Definitions, with N counted voxels, s_i = sum_j n_ij (prediction) and t_j = sum_i n_ij (truth):

- ``vi_split`` = H(pred | truth), ``vi_merge`` = H(truth | pred), ``vi`` = their sum, in bits.
- ``are_precision`` = sum n_ij^2 / sum s_i^2, ``are_recall`` = sum n_ij^2 / sum t_j^2,
  ``are`` = 1 - F1 of the two (Arganda-Carreras et al. 2015, as computed by CREMI). Splits lower
  the recall, merges the precision.
"""
from __future__ import annotations

import numpy as np

from ffn_jax.errors import UserError

PRED_UNLABELLED_MODES = ("as-segment", "ignore", "singletons")
TRUTH_ZERO_MODES = ("ignore", "as-segment")

_KEY_BITS = 32


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
  """Returns ``labels`` if it holds integer (or bool) IDs; raises UserError otherwise."""
  labels = np.asarray(labels)
  if labels.dtype == np.bool_ or np.issubdtype(labels.dtype, np.integer):
    return labels
  raise UserError(f"{name} has dtype {labels.dtype}; segmentations must hold integer IDs")


def _dense_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """Labels as uint64 below 2**32, plus the ID lookup table when they had to be renumbered."""
  if labels.size and (labels.min() < 0 or int(labels.max()) >= 1 << _KEY_BITS):
    ids, inverse = np.unique(labels, return_inverse=True)
    return inverse.astype(np.uint64).ravel(), ids
  return labels.astype(np.uint64).ravel(), None


def contingency_table(pred: np.ndarray, truth: np.ndarray):
  """Sparse contingency table of two equally shaped label arrays over all their voxels.

  Returns:
    (pred_ids_K, truth_ids_K, counts_K): the K nonzero cells, counts as int64.
  """
  pred = check_labels(pred, "the segmentation")
  truth = check_labels(truth, "the ground truth")
  if pred.shape != truth.shape:
    raise UserError(f"the segmentation has shape {pred.shape} and the ground truth "
                    f"{truth.shape}; they must be equal")
  pred_keys, pred_lut = _dense_ids(pred)
  truth_keys, truth_lut = _dense_ids(truth)
  keys, counts = np.unique((pred_keys << np.uint64(_KEY_BITS)) | truth_keys, return_counts=True)
  pred_ids = keys >> np.uint64(_KEY_BITS)
  truth_ids = keys & np.uint64((1 << _KEY_BITS) - 1)
  pred_ids = pred_lut[pred_ids] if pred_lut is not None else pred_ids.astype(pred.dtype)
  truth_ids = truth_lut[truth_ids] if truth_lut is not None else truth_ids.astype(truth.dtype)
  return pred_ids, truth_ids, counts.astype(np.int64)


def _entropy_bits(counts: np.ndarray, n: int) -> float:
  """H of the distribution counts / n; cells left out of ``counts`` are singletons (they add 0
  to sum c log c, only to n)."""
  c = counts[counts > 0].astype(np.float64)
  return float(np.log2(n) - np.sum(c * np.log2(c)) / n)


def _marginal(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
  _, inverse = np.unique(ids, return_inverse=True)
  return np.bincount(inverse.ravel(), weights=counts, minlength=0).astype(np.int64)


def _sum_sq(counts: np.ndarray) -> int:
  return int(np.sum(counts.astype(np.int64) ** 2))


def metrics_from_table(pred_ids, truth_ids, counts, pred_unlabelled: str = "as-segment",
                       truth_zero: str = "ignore") -> dict:
  """VI and adapted Rand error from a contingency table (see the module docstring).

  Returns:
    dict with vi, vi_split, vi_merge (bits), are, are_precision, are_recall, fraction_labelled
    (share of prediction != 0 among the voxels that truth_zero keeps), segments_pred and
    segments_truth (distinct nonzero IDs among counted voxels), voxels (counted), and the options.
  Raises:
    UserError: unknown option, or no voxel left to count.
  """
  if pred_unlabelled not in PRED_UNLABELLED_MODES:
    raise UserError(f"pred_unlabelled must be one of {PRED_UNLABELLED_MODES}, "
                    f"got {pred_unlabelled!r}")
  if truth_zero not in TRUTH_ZERO_MODES:
    raise UserError(f"truth_zero must be one of {TRUTH_ZERO_MODES}, got {truth_zero!r}")
  pred_ids, truth_ids = np.asarray(pred_ids), np.asarray(truth_ids)
  counts = np.asarray(counts, np.int64)
  if truth_zero == "ignore":
    keep = truth_ids != 0
    pred_ids, truth_ids, counts = pred_ids[keep], truth_ids[keep], counts[keep]
  truth_kept = int(counts.sum())
  unlabelled = pred_ids == 0
  fraction_labelled = float(counts[~unlabelled].sum() / truth_kept) if truth_kept else 0.0
  if pred_unlabelled == "ignore":
    pred_ids, truth_ids, counts = pred_ids[~unlabelled], truth_ids[~unlabelled], counts[~unlabelled]
    unlabelled = unlabelled[~unlabelled]
  n = int(counts.sum())
  if n == 0:
    raise UserError("no voxels left to evaluate: every voxel is excluded by truth_zero="
                    f"{truth_zero!r} / pred_unlabelled={pred_unlabelled!r}")

  truth_marginal = _marginal(truth_ids, counts)
  if pred_unlabelled == "singletons":
    # Each unlabelled voxel is its own cell and its own prediction segment: count 1, square 1.
    n_singletons = int(counts[unlabelled].sum())
    joint, pred_src_ids = counts[~unlabelled], pred_ids[~unlabelled]
  else:
    n_singletons = 0
    joint, pred_src_ids = counts, pred_ids
  pred_marginal = _marginal(pred_src_ids, joint)

  h_joint = _entropy_bits(joint, n)
  vi_split = max(0.0, h_joint - _entropy_bits(truth_marginal, n))
  vi_merge = max(0.0, h_joint - _entropy_bits(pred_marginal, n))

  sum_joint = _sum_sq(joint) + n_singletons
  precision = sum_joint / (_sum_sq(pred_marginal) + n_singletons)
  recall = sum_joint / _sum_sq(truth_marginal)
  f1 = 2.0 * precision * recall / (precision + recall)

  return {
      "vi": vi_split + vi_merge,
      "vi_split": vi_split,
      "vi_merge": vi_merge,
      "are": 1.0 - f1,
      "are_precision": precision,
      "are_recall": recall,
      "fraction_labelled": fraction_labelled,
      "segments_pred": int(np.unique(pred_ids[pred_ids != 0]).size),
      "segments_truth": int(np.unique(truth_ids[truth_ids != 0]).size),
      "voxels": n,
      "pred_unlabelled": pred_unlabelled,
      "truth_zero": truth_zero,
  }


def evaluate_segmentation(pred: np.ndarray, truth: np.ndarray,
                          pred_unlabelled: str = "as-segment", truth_zero: str = "ignore") -> dict:
  """VI and adapted Rand error of segmentation ``pred`` against ``truth`` (same shape, int IDs)."""
  return metrics_from_table(*contingency_table(pred, truth), pred_unlabelled=pred_unlabelled,
                            truth_zero=truth_zero)


def split_objects(reference: np.ndarray, seg: np.ndarray, min_size: int = 1000,
                  min_part: float = 0.1) -> int:
  """How many segments of ``reference`` (>= ``min_size`` voxels; 0 is not a segment) ``seg``
  spreads over two or more labels (0 included) that each hold >= ``min_part`` of it: objects one
  segmentation keeps whole and the other cuts, e.g. a stitched result against a single pass.
  Swap the arguments for the objects ``seg`` merges."""
  _, sizes, parts = _parts(reference, seg, min_part)
  return int(np.sum((sizes >= min_size) & (parts >= 2)))


def split_anew(truth: np.ndarray, reference: np.ndarray, seg: np.ndarray, min_size: int = 1000,
               min_part: float = 0.1) -> int:
  """How many objects of ``truth`` (>= ``min_size`` voxels) ``reference`` keeps whole and ``seg``
  splits, both in the sense of ``split_objects``: e.g. neurons a single pass kept in one piece
  and a stitched result cuts."""
  ids, sizes, parts_reference = _parts(truth, reference, min_part)
  ids_seg, _, parts_seg = _parts(truth, seg, min_part)
  assert np.array_equal(ids, ids_seg)
  return int(np.sum((sizes >= min_size) & (parts_reference < 2) & (parts_seg >= 2)))


def _parts(reference: np.ndarray, seg: np.ndarray, min_part: float):
  """Per non-zero ``reference`` segment: (ids, voxels, labels of ``seg`` that hold >=
  ``min_part`` of it)."""
  seg_ids, ref_ids, counts = contingency_table(seg, reference)
  keep = ref_ids != 0
  ref_ids, counts = ref_ids[keep], counts[keep]
  ids, inverse = np.unique(ref_ids, return_inverse=True)
  sizes = np.bincount(inverse, weights=counts)
  parts = np.bincount(inverse, weights=counts >= min_part * sizes[inverse])
  return ids, sizes, parts
