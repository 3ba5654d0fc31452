"""ffn_jax keeps freed host memory: a jitted function's big buffers are not faulted in anew on
every call (ffn_jax/host_memory.py). Page-fault counts, not timings: they do not depend on load."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's (mallopt); elsewhere ffn_jax leaves malloc alone")

# A jitted function with two 48 MiB outputs, run on an XLA worker thread
# (whose own malloc arena would hand blocks this big to mmap). Reports the page faults per call.
_PROBE = r"""
import json, resource
import ffn_jax
from ffn_jax import host_memory
import jax, jax.numpy as jnp
x = jnp.ones((12, 1024, 1024), jnp.float32)
f = jax.jit(lambda x: (x[::-1] * 2.0, x + 1.0))
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "status": host_memory.status()}))
"""


def _probe(**env):
  proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                        env=cli_env(**env), cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_big_buffers_are_reused_not_faulted_in_again():
  retained = _probe()
  assert retained["status"] == "in effect"
  default = _probe(FFN_JAX_RETAIN_MEMORY="0")
  assert default["status"] == "disabled by FFN_JAX_RETAIN_MEMORY=0"
  # 48 MiB is 12288 pages of 4 KiB: glibc's default maps and faults in at least that per call.
  assert min(default["faults"][1:]) > 11000, default
  # Retained: the heap grows while the next call's buffers are taken before the last call's are
  # freed (a few times, then it holds enough); after that the calls fault in nothing.
  assert sum(retained["faults"]) < 0.4 * sum(default["faults"]), (retained, default)
  assert sorted(retained["faults"][-10:])[5] < 500, retained
