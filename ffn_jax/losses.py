"""Soft-label sigmoid cross-entropy and FFN's precision/recall counts (pure)."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from ffn_jax.model import logit

PRED_POSITIVE_LOGIT = logit(0.9)  # FFN counts a voxel as predicted positive at p >= 0.9


def sigmoid_xent(logits, labels):
  """Mean sigmoid cross-entropy of logits against soft labels in [0, 1]."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


def confusion_counts(logits, labels) -> dict:
  """True/false positives and false negatives (float32 sums), summable across devices/ranks."""
  pred = logits >= PRED_POSITIVE_LOGIT
  true = labels > 0.5
  return {
      "tp": jnp.sum(pred & true, dtype=jnp.float32),
      "fp": jnp.sum(pred & ~true, dtype=jnp.float32),
      "fn": jnp.sum(~pred & true, dtype=jnp.float32),
  }


def precision_recall_f1(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
  precision = tp / (tp + fp) if tp + fp > 0 else 0.0
  recall = tp / (tp + fn) if tp + fn > 0 else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return precision, recall, f1
