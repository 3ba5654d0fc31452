"""Synchronous data parallelism: local devices (pmap) and MPI ranks (mpi4jax) give the same
parameters as one device with the whole batch; ranks stay bit-identical; divergence is caught."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import BIN, REPO, cli_env, read_metrics, run_train

pytestmark = pytest.mark.slow  # train.py / mpirun runs: the full tier only

SCRIPT = str(REPO / "tests" / "scripts" / "step_equivalence.py")


def _load(path):
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _assert_close(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=k)


def _run(cmd, **env):
  proc = subprocess.run(cmd, cwd=REPO, env=cli_env(PYTHONPATH=str(REPO), **env),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def test_two_local_devices_equal_one_device_with_double_batch(tmp_path):
  flags = "--xla_force_host_platform_device_count=2"
  _run([sys.executable, SCRIPT, str(tmp_path / "two.npz"), "--devices", "2"], XLA_FLAGS=flags)
  _run([sys.executable, SCRIPT, str(tmp_path / "one.npz"), "--devices", "1"], XLA_FLAGS=flags)
  _assert_close(_load(tmp_path / "two.rank0.npz"), _load(tmp_path / "one.rank0.npz"))


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path):
  _run([str(BIN / "mpirun"), "-n", "2", sys.executable, SCRIPT, str(tmp_path / "mpi.npz")])
  _run([sys.executable, SCRIPT, str(tmp_path / "single.npz")])
  r0, r1 = _load(tmp_path / "mpi.rank0.npz"), _load(tmp_path / "mpi.rank1.npz")
  for k in r0:  # ranks hold bit-identical parameters
    np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
  _assert_close(r0, _load(tmp_path / "single.rank0.npz"))


def test_mpirun_training_ends_with_identical_ranks(tiny_reference_2ranks):
  records = read_metrics(tiny_reference_2ranks[0])
  final = records[-1]
  assert final["ranks"] == 2 and final["global_batch"] == 2 * 2  # tiny: batch_size 2 per rank
  assert len(final["rank_fingerprints"]) == 2
  assert len(set(final["rank_fingerprints"])) == 1
  assert records[0]["ranks"] == 2 and records[0]["time_allreduce_s"] > 0


def test_resume_is_exact_with_two_ranks(tmp_path, tiny_reference_2ranks):
  first = run_train(tmp_path / "b", "--config.max_steps=15", ranks=2)
  assert first.returncode == 0, first.stderr
  resumed = run_train(tmp_path / "b", "--config.max_steps=30", ranks=2)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed" in resumed.stdout
  straight = read_metrics(tiny_reference_2ranks[0])[-1]
  assert read_metrics(tmp_path / "b")[-1]["rank_fingerprints"] == straight["rank_fingerprints"]


def test_desynchronized_rank_is_caught(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=20", "--config.debug.perturb_rank=1",
                   "--config.debug.perturb_at_step=3", ranks=2)
  assert proc.returncode != 0
  assert "ranks diverged at step 5" in proc.stderr and "rank(s) [1]" in proc.stderr, proc.stderr
