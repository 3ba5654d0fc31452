"""`make demo`, the first thing a new user runs, in small form: the Makefile's own commands (a
held-out synthetic volume, training, inference on it, its score and picture)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import BIN, REPO, cli_env, read_metrics


@pytest.mark.slow
def test_make_demo_trains_the_synthetic_config(tmp_path):
  if shutil.which("make") is None:
    pytest.skip("make not installed")
  workdir = tmp_path / "demo"

  def make():
    # -o setup: this interpreter's environment is already installed; PY/VBIN point make at it.
    return subprocess.run(
        ["make", "-o", "setup", "demo", f"PY={sys.executable}", f"VBIN={BIN}",
         f"DEMO_WORKDIR={workdir}", "DEMO_FLAGS=--config.max_steps=20 --config.log_every=10"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)

  proc = make()
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = read_metrics(workdir / "model")
  assert records[-1]["final"] and records[-1]["step"] == 20
  assert records[0]["global_batch"] == 4  # configs/demo.py is configs/synthetic.py's model
  counters = json.loads((workdir / "segment" / "counters.json").read_text())
  assert counters["complete"] and counters["bbox_size_zyx"] == [48, 80, 80]
  # (make run from make, e.g. `make test`, adds "make[1]: Leaving directory" lines.)
  lines = [line for line in proc.stdout.strip().splitlines() if not line.startswith("make")]
  scores = json.loads(lines[-1])
  assert scores["truth"].endswith("heldout/labels.zarr") and scores["vi"] >= 0
  assert lines[-2].startswith("VI ") and str(workdir / "preview.png") in lines[-2]
  assert (workdir / "preview.png").stat().st_size > 10_000
  # A rerun reuses the volume, the finished training and segmentation, and scores again.
  again = make()
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  again_lines = [line for line in again.stdout.strip().splitlines() if not line.startswith("make")]
  assert json.loads(again_lines[-1])["vi"] == scores["vi"]
