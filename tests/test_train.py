"""End-to-end training through train.py: learning, exact resume, metrics, clean errors."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, read_metrics, run_train
from ffn_jax.ops import onednn
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


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_reference):
  first = run_train(tmp_path / "b", "--config.max_steps=20")
  assert first.returncode == 0, first.stderr
  second = run_train(tmp_path / "b", "--config.max_steps=30")
  assert second.returncode == 0, second.stderr
  assert "resumed" in second.stdout
  fb = read_metrics(tmp_path / "b")[-1]["params_fingerprint"]
  assert fb == tiny_reference[1]  # 30 steps without a stop


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


def _write_tensorstore(path, driver: str, array) -> dict:
  """``array`` written with tensorstore's ``driver`` (zarr3, n5); returns its JSON spec."""
  import tensorstore as ts
  spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}}
  store = ts.open(spec, create=True, dtype=array.dtype.name, shape=array.shape,
                  chunk_layout=ts.ChunkLayout(chunk_shape=[16, 16, 16])).result()
  store.write(array).result()
  return spec


@pytest.fixture(scope="module")
def builtin_fingerprint(tmp_path_factory):
  """Final parameters of 5 steps of configs/tiny.py on its built-in synthetic volume."""
  workdir = tmp_path_factory.mktemp("builtin") / "w"
  proc = run_train(workdir, "--config.max_steps=5")
  assert proc.returncode == 0, proc.stderr
  return read_metrics(workdir)[-1]["params_fingerprint"]


@pytest.mark.slow
@pytest.mark.parametrize("formats", ["zarr", "zarr3+n5 spec"])
def test_trains_from_volumes(tmp_path, formats, builtin_fingerprint):
  """train.py reads zarr v2 paths, or a zarr v3 path and an n5 tensorstore JSON spec, to the
  same training run (same data, same parameters)."""
  from ffn_jax.data import synthetic
  image, labels = synthetic.make_volume((24, 40, 40), n_objects=10, seed=0)
  if formats == "zarr":
    write_zarr(str(tmp_path / "im.zarr"), image)
    write_zarr(str(tmp_path / "lab.zarr"), labels)
    sources = (f"{tmp_path}/im.zarr", f"{tmp_path}/lab.zarr")
  else:
    _write_tensorstore(tmp_path / "im.zarr3", "zarr3", image)
    spec = _write_tensorstore(tmp_path / "lab.n5", "n5", labels)
    sources = (f"{tmp_path}/im.zarr3", json.dumps(spec))
  proc = run_train(tmp_path / "w", "--config.max_steps=5", f"--config.data.image={sources[0]}",
                   f"--config.data.labels={sources[1]}")
  assert proc.returncode == 0, proc.stderr
  final = read_metrics(tmp_path / "w")[-1]
  assert final["step"] == 5
  # The files hold configs/tiny.py's own synthetic volume: the run equals the built-in one's.
  assert final["params_fingerprint"] == builtin_fingerprint


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=30", "--config.debug.nan_at_step=14")
  assert proc.returncode != 0
  assert "step 15" in proc.stderr and "nan" in proc.stderr.lower()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
  # The same command resumes from the good checkpoint (the poison was at step 14 only once the
  # debug flag is removed).
  again = run_train(tmp_path, "--config.max_steps=30")
  assert again.returncode == 0 and "resumed" in again.stdout and "step 10" in again.stdout


@pytest.mark.slow
def test_training_workdir_loads_for_inference(tmp_path):
  from ffn_jax import checkpoint
  from ffn_jax.model import count_params
  assert run_train(tmp_path, "--config.max_steps=10").returncode == 0
  params, meta = checkpoint.load_params(str(tmp_path))
  assert meta["model"]["depth"] == 2 and count_params(params) > 0
  assert set(params) == {"conv0_a", "conv0_b", "conv1_a", "conv1_b", "conv_lom"}


def _infer_small(checkpoint, workdir, env):
  """infer.py with configs/synthetic_infer.py on a small synthetic volume; asserts it ran."""
  proc = subprocess.run(
      [sys.executable, "infer.py", "--config", "configs/synthetic_infer.py", "--workdir",
       str(workdir), f"--config.checkpoint={checkpoint}",
       "--config.synthetic.shape_zyx=(20,28,28)", "--config.synthetic.objects=4",
       "--config.inference.min_segment_size=10", "--config.progress_interval_s=-1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return proc


def test_bfloat16_trains_and_infers_where_onednn_cannot_build_it(tmp_path):
  """An AVX2-only CPU (AMD Zen 3), emulated here with ONEDNN_MAX_CPU_ISA=AVX2, which makes
  oneDNN refuse bf16 convolutions as it does there: compute_dtype=bfloat16 trains and infers on
  xla_bf16 and says why; an explicit conv_impl=onednn_bf16 is one error line, exit 2."""
  env = cli_env(ONEDNN_MAX_CPU_ISA="AVX2")
  proc = run_train(tmp_path / "w", "--config.max_steps=3", "--config.model.compute_dtype=bfloat16",
                   env=env)
  assert proc.returncode == 0, proc.stderr
  assert "compute: bfloat16 convolutions, route xla_bf16" in proc.stdout, proc.stdout
  if onednn.available():
    assert "cannot build a bfloat16 convolution" in proc.stdout
  assert read_metrics(tmp_path / "w")[-1]["step"] == 3
  infer = _infer_small(tmp_path / "w", tmp_path / "i", env)
  assert "compute: bfloat16 convolutions, route xla_bf16" in infer.stdout, infer.stdout
  assert json.loads((tmp_path / "i" / "counters.json").read_text())["fov_calls"] > 0
  assert (tmp_path / "i" / "segmentation.zarr").exists()

  bad = run_train(tmp_path / "x", "--config.max_steps=1", "--config.model.conv_impl=onednn_bf16",
                  env=env)
  assert bad.returncode == 2, bad.stderr
  lines = bad.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "onednn_bf16" in lines[0], lines
  assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_compute_dtype_is_recorded_and_inference_follows_it(tmp_path):
  """model.compute_dtype=bfloat16 trains with bf16 convs (float32 parameters), the checkpoint
  records it, and inference uses it unless told otherwise."""
  import ml_collections
  from ffn_jax import checkpoint
  from ffn_jax.inference import settings
  proc = run_train(tmp_path / "w", "--config.max_steps=4", "--config.model.compute_dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr
  assert "compute: bfloat16 convolutions" in proc.stdout
  params, meta = checkpoint.load_params(str(tmp_path / "w"))
  assert meta["compute_dtype"] == "bfloat16"
  assert {str(p.dtype) for p in jax.tree_util.tree_leaves(params)} == {"float32"}
  config = ml_collections.ConfigDict({"conv_impl": "auto", "compute_dtype": ""})
  assert settings.compute_route(config, meta["compute_dtype"])[1] == "bfloat16"
  # infer.py end to end on this CPU's bf16 route (onednn_bf16 or xla_bf16), from the checkpoint.
  route = settings.compute_route(config, "bfloat16")[0]
  infer = _infer_small(tmp_path / "w", tmp_path / "i", cli_env())
  assert f"compute: bfloat16 convolutions, route {route}" in infer.stdout, infer.stdout
  assert json.loads((tmp_path / "i" / "counters.json").read_text())["fov_calls"] > 0
  config.compute_dtype = "float32"
  assert settings.compute_route(config, meta["compute_dtype"])[:2] == (
      settings.compute_route(config, "float32")[0], "float32")

  bad = run_train(tmp_path / "x", "--config.max_steps=1", "--config.model.compute_dtype=fp16")
  assert bad.returncode == 2 and "compute_dtype" in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_moving_average_is_checkpointed_resumed_exactly_and_what_inference_loads(tmp_path):
  """optim.ema_decay: the average is saved and restored bit for bit (6 + 6 steps equal 12
  straight), leaves the raw training untouched (same fingerprint as without it), is what
  load_params (infer.py, fine-tuning) returns, and a workdir of one setting refuses the other."""
  from ffn_jax import checkpoint
  ema = "--config.optim.ema_decay=0.9"
  for workdir, steps in (("split", 6), ("split", 12), ("straight", 12)):
    proc = run_train(tmp_path / workdir, ema, f"--config.max_steps={steps}")
    assert proc.returncode == 0, proc.stderr
  plain = run_train(tmp_path / "plain", "--config.max_steps=12")
  assert plain.returncode == 0, plain.stderr
  fingerprint = lambda w: read_metrics(tmp_path / w)[-1]["params_fingerprint"]  # noqa: E731
  assert fingerprint("split") == fingerprint("straight") == fingerprint("plain")
  leaves = lambda w, **k: jax.tree_util.tree_leaves(  # noqa: E731
      checkpoint.load_params(str(tmp_path / w), **k)[0])
  for a, b in zip(leaves("split"), leaves("straight")):
    np.testing.assert_array_equal(a, b)
  for a, b, c in zip(leaves("split"), leaves("split", ema=False), leaves("plain")):
    np.testing.assert_array_equal(b, c)  # the raw parameters are the plain run's
  assert not all(np.array_equal(a, b) for a, b in zip(leaves("split"), leaves("plain")))
  assert checkpoint.load_params(str(tmp_path / "split"))[1]["ema_decay"] == 0.9
  refused = run_train(tmp_path / "split", "--config.max_steps=14")
  assert refused.returncode == 2 and "ema_decay" in refused.stderr, refused.stderr
  bad = run_train(tmp_path / "bad", "--config.optim.ema_decay=1.0", "--config.max_steps=1")
  assert bad.returncode == 2 and "optim.ema_decay" in bad.stderr, bad.stderr
