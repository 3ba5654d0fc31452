"""`make demo`, the first thing a new user runs, in small form: the Makefile's own command."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import BIN, REPO, cli_env, read_metrics


@pytest.mark.slow
def test_make_demo_trains_the_synthetic_config(tmp_path):
  if shutil.which("make") is None:
    pytest.skip("make not installed")
  # -o setup: this interpreter's environment is already installed; PY/VBIN point make at it.
  proc = subprocess.run(
      ["make", "-o", "setup", "demo", f"PY={sys.executable}", f"VBIN={BIN}",
       f"DEMO_WORKDIR={tmp_path / 'demo'}", "DEMO_FLAGS=--config.max_steps=20 --config.log_every=10"],
      cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  records = read_metrics(tmp_path / "demo")
  assert records[-1]["final"] and records[-1]["step"] == 20
  assert records[0]["loss"] > 0 and records[0]["global_batch"] == 4  # configs/synthetic.py
  assert f"Results: {tmp_path / 'demo'}/metrics.jsonl" in proc.stdout
