"""Keep freed host memory in the process, so that XLA's per-step buffers are not faulted in anew.

On CPU, every run of a jitted function gets its temporaries (for a training step: the
activations kept for the backward pass, ~680 MB for the FIB-25 model at batch 4) and outputs
from ``posix_memalign``. glibc serves requests that large with a fresh ``mmap`` and gives the
pages back with ``munmap`` on free, so each step first-touches every page again: ~166,000 page
faults and ~0.35 s of kernel time per step, most of it inside the convolutions that write those
buffers. XLA's worker threads even take the ``mmap`` path with ``M_MMAP_MAX=0``, because a
thread arena cannot hold a block larger than 64 MB and then falls back to ``mmap``.

``retain_freed_memory`` tells glibc to serve every thread from the main heap
(``M_ARENA_MAX=1``), never to ``mmap`` (``M_MMAP_MAX=0``) and never to return the heap's free
top to the system (``M_TRIM_THRESHOLD=-1``). Freed blocks are then reused by the next step, as
TensorFlow's own allocator does; the process keeps its peak heap until it exits. Measured on the
FIB-25 training step (batch 4, onednn route, 2 cores): 670 -> 618 ms per FOV, 166,546 -> 0 page
faults per step; ``train.py`` 1.49 -> 1.57 FOV/s with a lower peak RSS (1.16 vs 1.24 GB).
The cost: a loop that dispatches the next step before the previous one's buffers are freed
takes fresh blocks a few times until the heap holds enough (a tight benchmark loop of that step
plateaus near 4 GB); ``bench/conv_stack.py --our-malloc default`` compares.

``ffn_jax`` calls it on import, before jax starts its threads (threads that already hold an
arena keep it, so importing ffn_jax after running jax computations helps less). Set
``FFN_JAX_RETAIN_MEMORY=0`` to keep glibc's defaults. Elsewhere than Linux/glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# The same settings as glibc environment variables, read at process start (for processes that do
# not import ffn_jax, e.g. the peers of bench/conv_stack.py). 2**62 stands in for "never trim".
GLIBC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
             "MALLOC_TRIM_THRESHOLD_": str(2**62)}

_state = {"retained": False, "reason": "not requested"}


def retain_freed_memory() -> bool:
  """Applies the glibc settings above; returns whether they are in effect."""
  if _state["retained"]:
    return True
  if os.environ.get("FFN_JAX_RETAIN_MEMORY", "1") == "0":
    _state["reason"] = "disabled by FFN_JAX_RETAIN_MEMORY=0"
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    _state["reason"] = "not Linux with glibc"
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError) as e:
    _state["reason"] = f"mallopt unavailable: {e}"
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  # mallopt returns 1 on success. -1 as the trim threshold means "never trim" (mallopt(3)).
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _state["retained"] = ok
  _state["reason"] = "in effect" if ok else "mallopt refused a setting"
  return ok


def status() -> str:
  """``"in effect"``, or why the settings are not applied."""
  return _state["reason"]
