"""Everything about distribution lives here: MPI ranks, local devices, the collectives (the
gradient allreduce, broadcast from rank 0, barriers, gathers, agreement), and "only rank 0
writes". The train step that uses them is ``ffn_jax.training.distributed.DistributedStep``.

Gradients are averaged over the local devices inside ``jax.pmap`` with ``lax.pmean`` (axis
``DEVICE_AXIS``), then over MPI ranks with ``allreduce_mean``: ``mpi4jax.allreduce`` on one
flattened buffer (gradients + step stats), once per step, inside the jitted update (mpi4jax
cannot run inside a pmap over several devices).
Without an MPI launcher the code runs as a single rank and never imports MPI.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
DEVICE_AXIS = "devices"  # the pmap axis the local devices average gradients over


def launched_with_mpi() -> bool:
  if os.environ.get("FFN_JAX_MPI", "").lower() in ("0", "false", "no"):
    return False
  if os.environ.get("FFN_JAX_MPI", "").lower() in ("1", "true", "yes"):
    return True
  if any(k in os.environ for k in _MPI_ENV):
    return True
  # srun without --mpi=pmix sets only SLURM variables; several tasks means MPI is meant.
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


@dataclasses.dataclass
class Dist:
  """This process's place in the job."""
  rank: int = 0
  size: int = 1
  comm: Any = None  # mpi4py communicator, None for a single process
  devices: list = dataclasses.field(default_factory=jax.local_devices)

  @property
  def is_primary(self) -> bool:
    return self.rank == 0

  @property
  def local_devices(self) -> int:
    return len(self.devices)

  def barrier(self) -> None:
    if self.comm is not None:
      self.comm.Barrier()

  def allgather(self, obj):
    return [obj] if self.comm is None else self.comm.allgather(obj)

  def broadcast_tree(self, tree):
    """Rank 0's arrays on every rank (as numpy), bit for bit."""
    if self.comm is None:
      return tree
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(np.asarray, tree))
    buf = np.array(flat, copy=True)  # writable: ranks > 0 receive into it
    self.comm.Bcast(buf, root=0)
    return jax.tree_util.tree_map(np.asarray, unravel(buf))

  def bcast(self, obj, root: int = 0, heartbeat=None, poll_s: float = 0.05):
    """``root``'s (picklable) ``obj`` on every rank.

    The other ranks may wait long (``root`` is running an evaluation): they first meet in a
    non-blocking barrier polled every ``poll_s`` seconds, calling ``heartbeat()`` meanwhile,
    instead of spinning a core in MPI's busy wait, which would slow ``root`` down on a shared
    node.
    """
    if self.comm is None:
      return obj
    request = self.comm.Ibarrier()
    while not request.Test():
      if heartbeat is not None:
        heartbeat()
      time.sleep(poll_s)
    return self.comm.bcast(obj, root=root)

  def agree(self, primary_flags: list[bool], any_flag: bool) -> tuple[list[bool], bool]:
    """One collective per step: rank 0's ``primary_flags`` (decisions taken on its clock, such
    as time-based schedules) and whether any rank raised ``any_flag`` (SIGTERM), on every rank.
    """
    if self.comm is None:
      return list(primary_flags), bool(any_flag)
    gathered = self.comm.allgather((list(primary_flags), bool(any_flag)))
    return gathered[0][0], any(flag for _, flag in gathered)


def mpi_world():
  """(rank, size) if this process has MPI initialized, else None. Never initializes MPI."""
  mpi = sys.modules.get("mpi4py.MPI")
  if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
    return None
  return mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()


# MPI_Abort tears the job down at once; the launcher may not yet have forwarded the failing
# rank's last lines (its error message) to the terminal. A short pause lets them through.
_ABORT_FLUSH_S = 1.0


def _abort_all_ranks(code: int) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  world = mpi_world()
  if world is not None and world[1] > 1:
    time.sleep(_ABORT_FLUSH_S)
    sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)


def abort_job(code: int) -> None:
  """Ends all ranks when one of them fails, so no rank waits forever in a collective."""
  _abort_all_ranks(code)
  sys.exit(code)


def hard_exit(code: int) -> None:
  """Ends this process now, from any thread, even while the main thread is blocked in XLA or
  an MPI collective; under MPI it aborts every rank (MPI_Abort), so none is left waiting."""
  _abort_all_ranks(code)
  os._exit(code)


def init() -> Dist:
  """Sets up the process group: MPI if launched by mpirun/srun, else one rank."""
  if not launched_with_mpi():
    return Dist()
  from mpi4py import MPI  # local: plain single-process runs need no MPI runtime
  comm = MPI.COMM_WORLD
  return Dist(rank=comm.Get_rank(), size=comm.Get_size(), comm=comm)


def node_rank(dist: Dist) -> tuple[int, int]:
  """(this rank's index among the ranks on its node, the number of ranks on the node).

  Collective under MPI: every rank must call it."""
  if dist.comm is None:
    return 0, 1
  from mpi4py import MPI
  node = dist.comm.Split_type(MPI.COMM_TYPE_SHARED)
  try:
    return node.Get_rank(), node.Get_size()
  finally:
    node.Free()


def pick_device(devices: list, node_rank_: int):
  """The device of the rank with index ``node_rank_`` on its node: one device each, in turn.

  With one visible device (a CPU, or ``srun --gpus-per-task=1``) every rank takes it."""
  return devices[node_rank_ % len(devices)]


def rank_device(dist: Dist):
  """This rank's inference device: its own local accelerator when the node's ranks share
  several (rank r of the node takes local device r mod n). Collective under MPI."""
  return pick_device(jax.local_devices(), node_rank(dist)[0])


def allreduce_mean(flat, dist: Dist):
  """Inside ``jax.jit``: the mean over ranks of one flat array, as one MPI allreduce (a sum,
  then divided by the rank count); the array itself on one rank. mpi4jax cannot run inside a
  pmap over several devices: average over local devices first (``lax.pmean`` over
  ``DEVICE_AXIS``), then call this on one device's copy."""
  if dist.size == 1:
    return flat
  import mpi4jax
  from mpi4py import MPI
  return mpi4jax.allreduce(flat, op=MPI.SUM, comm=dist.comm) / dist.size


def put_on_first_device(tree, dist: Dist):
  return jax.device_put(tree, dist.devices[0])

