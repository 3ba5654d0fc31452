"""End-to-end training through train.py: learning, exact resume, metrics, clean errors."""
import json

import jax
import numpy as np
import pytest

from conftest import read_metrics, run_train
from ffn_jax.data.volumes import write_zarr


def test_loss_decreases_and_metrics_are_complete(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=200", "--config.log_every=25",
                   "--config.batch_size=4", "--config.checkpoint_every=1000")
  assert proc.returncode == 0, proc.stderr
  records = read_metrics(tmp_path)
  steps, final = records[:-1], records[-1]
  for key in ("step", "loss", "learning_rate", "precision", "recall", "f1", "fovs_per_s",
              "ranks", "local_devices", "global_batch", "time_step_s", "time_allreduce_s"):
    assert key in steps[0], key
  first, last = steps[0]["loss"], np.mean([r["loss"] for r in steps[-2:]])
  assert last < 0.75 * first, [r["loss"] for r in steps]
  assert final["final"] is True and final["step"] == 200
  assert len(final["params_fingerprint"]) == 64
  assert "ETA" in proc.stdout


def test_resume_is_exact(tmp_path):
  straight = run_train(tmp_path / "a", "--config.max_steps=30")
  assert straight.returncode == 0, straight.stderr
  first = run_train(tmp_path / "b", "--config.max_steps=20")
  assert first.returncode == 0, first.stderr
  second = run_train(tmp_path / "b", "--config.max_steps=30")
  assert second.returncode == 0, second.stderr
  assert "resumed" in second.stdout
  fa = read_metrics(tmp_path / "a")[-1]["params_fingerprint"]
  fb = read_metrics(tmp_path / "b")[-1]["params_fingerprint"]
  assert fa == fb


def test_bad_config_key_is_one_line_exit_2(tmp_path):
  proc = run_train(tmp_path, "--config.max_stepz=3")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "max_stepz" in lines[0], proc.stderr


def test_wrong_type_config_value_is_one_line_exit_2(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=many")
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and "max_steps" in proc.stderr


def test_missing_volume_is_one_line_exit_2(tmp_path):
  proc = run_train(tmp_path, f"--config.data.image={tmp_path}/nope.zarr",
                   f"--config.data.labels={tmp_path}/nope_labels.zarr")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "nope.zarr" in lines[0] and "not found" in lines[0]


def test_trains_from_zarr_volumes(tmp_path):
  from ffn_jax.data import synthetic
  image, labels = synthetic.make_volume((24, 40, 40), n_objects=10, seed=0)
  write_zarr(str(tmp_path / "im.zarr"), image)
  write_zarr(str(tmp_path / "lab.zarr"), labels)
  proc = run_train(tmp_path / "w", "--config.max_steps=5", f"--config.data.image={tmp_path}/im.zarr",
                   f"--config.data.labels={tmp_path}/lab.zarr")
  assert proc.returncode == 0, proc.stderr
  assert read_metrics(tmp_path / "w")[-1]["step"] == 5


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=30", "--config.debug.nan_at_step=14")
  assert proc.returncode != 0
  assert "step 15" in proc.stderr and "nan" in proc.stderr.lower()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
  # The same command resumes from the good checkpoint (the poison was at step 14 only once the
  # debug flag is removed).
  again = run_train(tmp_path, "--config.max_steps=30")
  assert again.returncode == 0 and "resumed" in again.stdout and "step 10" in again.stdout


def test_training_workdir_loads_for_inference(tmp_path):
  from ffn_jax import checkpoint
  from ffn_jax.model import count_params
  assert run_train(tmp_path, "--config.max_steps=10").returncode == 0
  params, meta = checkpoint.load_params(str(tmp_path))
  assert meta["model"]["depth"] == 2 and count_params(params) > 0
  assert set(params) == {"conv0_a", "conv0_b", "conv1_a", "conv1_b", "conv_lom"}


def test_compute_dtype_is_recorded_and_inference_follows_it(tmp_path):
  """model.compute_dtype=bfloat16 trains with bf16 convs (float32 parameters), the checkpoint
  records it, and inference uses it unless told otherwise."""
  import ml_collections
  from ffn_jax import checkpoint
  from ffn_jax.inference import runner
  proc = run_train(tmp_path / "w", "--config.max_steps=4", "--config.model.compute_dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr
  assert "compute: bfloat16 convolutions" in proc.stdout
  params, meta = checkpoint.load_params(str(tmp_path / "w"))
  assert meta["compute_dtype"] == "bfloat16"
  assert {str(p.dtype) for p in jax.tree_util.tree_leaves(params)} == {"float32"}
  config = ml_collections.ConfigDict({"conv_impl": "auto", "compute_dtype": ""})
  assert runner.compute_route(config, meta["compute_dtype"])[1] == "bfloat16"
  config.compute_dtype = "float32"
  assert runner.compute_route(config, meta["compute_dtype"])[:2] == (
      runner.compute_route(config, "float32")[0], "float32")

  bad = run_train(tmp_path / "x", "--config.max_steps=1", "--config.model.compute_dtype=fp16")
  assert bad.returncode == 2 and "compute_dtype" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
