"""Train state and the parameter fingerprint."""
from __future__ import annotations

import hashlib

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: object
  rng: jax.Array  # uint32 key data; kept so every run's randomness is restorable


def params_fingerprint(params) -> str:
  """SHA-256 hex digest of all parameter bytes, leaves in flattened (sorted-key) tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(arr.dtype).encode())
    digest.update(str(arr.shape).encode())
    digest.update(arr.tobytes())
  return digest.hexdigest()
