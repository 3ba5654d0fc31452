"""The one jitted FFN prediction used by inference: a fixed-shape batch of FOVs -> logits.

``Predictor`` is a host callable ``predict(image_BZYX, seed_BZYX) -> logits_BZYX`` (numpy in,
numpy out) around one jitted ``FFN(...).apply`` (logits = input seed + update). A batch of
1..batch_size FOVs is zero-padded to a fixed compiled batch: with ``pad="full"`` always to
batch_size (one compilation), with ``pad="buckets"`` to the next power of two (at most
log2(batch_size) + 2 compilations). Buckets matter on CPUs, where a padded FOV costs as much as a
real one and the canvas often has fewer segments ready than batch_size.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from ffn_jax import model as model_lib


def _forward(net: model_lib.FFN, params, image_BZYX1, seed_BZYX1):
  return net.apply({"params": params}, image_BZYX1, seed_BZYX1)


class Predictor:
  """Fixed-shape batched FFN forward; counts calls and device time.

  Attributes:
    batch_size: largest batch; calls with fewer FOVs are zero-padded (see module docstring).
    fov_calls: number of FOVs predicted (padding not counted).
    padded_fovs: number of padding FOVs computed.
    batches: number of device calls.
    predict_s: wall seconds spent in device calls (including transfers, excluding compiles).
    compile_s: seconds spent compiling.
  """

  def __init__(self, params, depth: int, features: int, fov_size_zyx, batch_size: int,
               conv_impl: str = "auto", precision: str = "highest", pad: str = "buckets"):
    if pad not in ("buckets", "full"):
      raise ValueError(f"pad must be 'buckets' or 'full', got {pad!r}")
    self.batch_size = int(batch_size)
    self.fov_size = tuple(int(v) for v in fov_size_zyx)
    self.precision = precision
    sizes = {self.batch_size}
    if pad == "buckets":
      b = 1
      while b < self.batch_size:
        sizes.add(b)
        b *= 2
    self.buckets = sorted(sizes)
    self._compiled: set = set()
    net = model_lib.FFN(depth=depth, features=features, conv_impl=conv_impl)
    self._params = jax.device_put(params)
    self._fn = jax.jit(lambda p, img, seed: _forward(net, p, img, seed))
    self.fov_calls = 0
    self.padded_fovs = 0
    self.batches = 0
    self.predict_s = 0.0
    self.compile_s = 0.0

  def set_params(self, params) -> None:
    """Swaps in other parameters of the same model (no recompilation: they are an argument)."""
    self._params = jax.device_put(params)

  def _run(self, image_BZYX1, seed_BZYX1) -> np.ndarray:
    with jax.default_matmul_precision(self.precision):
      return np.asarray(self._fn(self._params, image_BZYX1, seed_BZYX1))

  def _ensure_compiled(self, bucket: int) -> None:
    if bucket in self._compiled:
      return
    t0 = time.perf_counter()
    zeros = np.zeros((bucket, *self.fov_size, 1), np.float32)
    self._run(zeros, zeros)
    self._compiled.add(bucket)
    self.compile_s += time.perf_counter() - t0

  def compile(self) -> float:
    """Compiles the largest batch now (others on first use); returns compile seconds so far."""
    self._ensure_compiled(self.batch_size)
    return self.compile_s

  def __call__(self, image_BZYX: np.ndarray, seed_BZYX: np.ndarray) -> np.ndarray:
    n = image_BZYX.shape[0]
    if not 1 <= n <= self.batch_size:
      raise ValueError(f"batch of {n} FOVs; this predictor takes 1..{self.batch_size}")
    bucket = next(b for b in self.buckets if b >= n)
    self._ensure_compiled(bucket)
    t0 = time.perf_counter()
    image = np.zeros((bucket, *self.fov_size, 1), np.float32)
    seed = np.zeros_like(image)
    image[:n, ..., 0] = image_BZYX
    seed[:n, ..., 0] = seed_BZYX
    logits = self._run(image, seed)
    self.predict_s += time.perf_counter() - t0
    self.fov_calls += n
    self.padded_fovs += bucket - n
    self.batches += 1
    return logits[:n, ..., 0].copy()
