"""The suite itself: where ../shared/data is missing, a data test skips with a reason for a
user, and fails under FFN_JAX_TEST_STRICT=1 (CI), so that CI cannot pass without the data."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, cli_env

DATA_TEST = "tests/test_evaluation.py::test_official_google_segmentation_on_c64"


def _pytest(tmp_path, **env):
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                         DATA_TEST], cwd=REPO, env=cli_env(**env), capture_output=True,
                        text=True, timeout=120)


@pytest.mark.slow
def test_missing_shared_data_skips_for_users_and_fails_in_ci(tmp_path):
  missing = tmp_path / "no_data"
  user = _pytest(tmp_path, FFN_SHARED_DATA=missing, FFN_JAX_TEST_STRICT="0")
  assert user.returncode == 0 and "1 skipped" in user.stdout, user.stdout
  assert f"shared data not available: {missing}" in user.stdout
  ci = _pytest(tmp_path, FFN_SHARED_DATA=missing, FFN_JAX_TEST_STRICT="1")
  assert ci.returncode != 0, ci.stdout
  assert "shared data folder" in ci.stdout + ci.stderr and str(missing) in ci.stdout + ci.stderr
  # The folder there, one file missing: that test fails, naming the file.
  missing.mkdir()
  ci = _pytest(tmp_path, FFN_SHARED_DATA=missing, FFN_JAX_TEST_STRICT="1")
  assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout
  assert "official_segmentation_training_sample2.zarr" in ci.stdout
