"""The synchronous data-parallel train step of one rank: the pure step of ``step.py`` with
its gradients averaged over local devices (``jax.pmap`` + ``lax.pmean``) and then over MPI ranks
(one allreduce of the flattened gradient and step stats, ``parallel.allreduce_mean``)."""
from __future__ import annotations

import time

import jax
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from ffn_jax import parallel
from ffn_jax.training import step as step_lib


class DistributedStep:
  """The synchronous data-parallel train step of this rank.

  ``__call__(state, batch_BZYX1)`` splits the rank's batch over local devices, runs the pmapped
  gradient (pmean over devices), then one jitted update that allreduces the flattened gradient
  across ranks and applies the optimizer. Returns (state, stats, logits, timings).
  """

  def __init__(self, dist: parallel.Dist, model, tx, ema_decay: float = 0.0):
    self.dist = dist
    devices = dist.devices
    self.num_devices = len(devices)

    def local_grads(params, batch):
      grads, stats, logits = step_lib.grads_and_stats(params, batch, model=model)
      axis = parallel.DEVICE_AXIS
      return lax.pmean(grads, axis), lax.pmean(stats, axis), logits

    # in_axes=None: pmap hands the same params to every local device.
    self._grads = jax.pmap(local_grads, axis_name=parallel.DEVICE_AXIS, in_axes=(None, 0),
                           devices=devices)

    def update(state, grads_1, stats_1):
      grads = jax.tree_util.tree_map(lambda g: g[0], grads_1)
      stats = jax.tree_util.tree_map(lambda s: s[0], stats_1)
      if dist.size > 1:
        flat, unravel = ravel_pytree((grads, stats))
        grads, stats = unravel(parallel.allreduce_mean(flat, dist))
      return step_lib.apply_update(state, grads, tx=tx, ema_decay=ema_decay), stats

    self._update = jax.jit(update, donate_argnums=0)

  def shard(self, array_B):
    b = array_B.shape[0]
    if b % self.num_devices:
      raise ValueError(f"batch of {b} does not split over {self.num_devices} local devices")
    return array_B.reshape(self.num_devices, b // self.num_devices, *array_B.shape[1:])

  def __call__(self, state, batch: dict):
    t0 = time.perf_counter()
    batch_D = {k: self.shard(v) for k, v in batch.items()}
    grads_D, stats_D, logits_D = self._grads(state.params, batch_D)
    first = lambda x: x.addressable_shards[0].data
    grads_1 = jax.tree_util.tree_map(first, grads_D)
    stats_1 = jax.tree_util.tree_map(first, stats_D)
    jax.block_until_ready(grads_1)
    t1 = time.perf_counter()
    state, stats = self._update(state, grads_1, stats_1)
    stats = jax.device_get(stats)
    t2 = time.perf_counter()
    logits = np.asarray(logits_D).reshape(-1, *logits_D.shape[2:])
    return state, stats, logits, {"time_step_s": t1 - t0, "time_allreduce_s": t2 - t1}
