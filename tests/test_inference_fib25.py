"""Google's pretrained FIB-25 model, imported without TensorFlow, segments crop c64 of
training_sample2 as well as Google's TensorFlow code does (VI 1.763 bits, 67 FOV calls)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env, shared_data
from ffn_jax import evaluation
from ffn_jax.data import volumes

TF_VI_C64 = 1.763  # Google's TF inference on c64 on this machine (issue #4)


@pytest.fixture(scope="module")
def fib25_checkpoint(tmp_path_factory):
  ckpt = shared_data("google_ffn_fib25", "model.ckpt-27465036.index")
  out = tmp_path_factory.mktemp("fib25") / "ckpt"
  proc = subprocess.run([sys.executable, "-m", "ffn_jax.import_tf_checkpoint",
                         str(ckpt)[:-len(".index")], "--out", str(out)],
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return out


def test_c64_segmentation_matches_tensorflow(fib25_checkpoint, tmp_path):
  labels = shared_data("fib25_training_sample2", "labels.zarr")
  out = tmp_path / "seg"
  # The command exactly as the README documents it for scripted use.
  proc = subprocess.run(
      [sys.executable, "infer.py", "--config", "configs/fib25_infer.py", "--workdir", str(out),
       f"--config.checkpoint={fib25_checkpoint}", "--config.bbox_start_zyx=(93,93,93)",
       "--config.bbox_size_zyx=(64,64,64)"],
      cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr
  counters = json.loads((out / "counters.json").read_text())
  assert counters["fov_calls"] == 67
  seg = volumes.open_volume(str(out / "segmentation.zarr")).read()
  truth = volumes.open_volume(str(labels)).read((93, 93, 93), (64, 64, 64))
  m = evaluation.evaluate_segmentation(seg, truth)
  assert m["vi"] <= TF_VI_C64 + 5e-4, m
  assert (out / "preview.png").stat().st_size > 0
