"""ffn_jax: flood-filling networks in JAX/Flax with synchronous MPI data-parallel training.

Arrays are zyx (numpy order) everywhere: volumes are [z, y, x], batches are [B, z, y, x, C].
"""
import os as _os

# On jaxlib 0.10 CPU, 2-D convolutions are otherwise handed to YNNPACK, which is 1.5-1.8x slower
# than XLA's own conv for our "3-D as 2-D" route (see docs in ffn_jax/conv.py). The flag only takes
# effect if set before jax initialises its backend, so it is set on package import.
_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
if _FLAG.split("=")[0] not in _os.environ.get("XLA_FLAGS", "") and not _os.environ.get(
    "FFN_JAX_NO_XLA_FLAGS"
):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# Before jax starts its threads: reuse freed host memory instead of faulting in every step's
# buffers anew (ffn_jax/host_memory.py; FFN_JAX_RETAIN_MEMORY=0 turns it off).
from ffn_jax import host_memory as _host_memory  # pylint: disable=wrong-import-position

_host_memory.retain_freed_memory()

__version__ = "0.1.0"
