"""Fine-tuning from a checkpoint (``config.init_checkpoint``) and pluggable optax optimizers."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env, read_metrics, run_train, shared_data

pytestmark = pytest.mark.slow  # train.py / mpirun runs: the full tier only


def test_init_checkpoint_loads_weights_then_resume_uses_the_runs_own(tmp_path):
  assert run_train(tmp_path / "base", "--config.max_steps=30").returncode == 0
  base_final = read_metrics(tmp_path / "base")[-1]
  # Fine-tune for 0 steps: the parameters are exactly the base run's.
  proc = run_train(tmp_path / "zero", "--config.max_steps=0",
                   f"--config.init_checkpoint={tmp_path / 'base'}")
  assert proc.returncode == 0, proc.stderr
  assert "fine-tuning from" in proc.stdout
  assert read_metrics(tmp_path / "zero")[-1]["params_fingerprint"] == \
      base_final["params_fingerprint"]
  # The fine-tuning run's own resume is exact, and ignores init_checkpoint once it has steps.
  init = f"--config.init_checkpoint={tmp_path / 'base'}"
  assert run_train(tmp_path / "a", "--config.max_steps=20", init).returncode == 0
  assert run_train(tmp_path / "b", "--config.max_steps=10", init).returncode == 0
  resumed = run_train(tmp_path / "b", "--config.max_steps=20", init)
  assert resumed.returncode == 0 and "resumed" in resumed.stdout
  assert "fine-tuning from" not in resumed.stdout
  assert (read_metrics(tmp_path / "a")[-1]["params_fingerprint"]
          == read_metrics(tmp_path / "b")[-1]["params_fingerprint"])
  # It starts from the base run's weights, not from scratch: its first loss is the base's level.
  scratch = read_metrics(tmp_path / "base")[0]["loss"]
  tuned = read_metrics(tmp_path / "a")[0]["loss"]
  assert tuned < scratch, (tuned, scratch)


@pytest.mark.parametrize("override,text", [
    ("--config.model.depth=3", "depth 2 (checkpoint) vs 3 (config)"),
    ("--config.model.fov_size_zyx=(11,11,11)", "fov_size_zyx"),
])
def test_geometry_mismatch_is_one_line_exit_2(tmp_path, override, text):
  assert run_train(tmp_path / "base", "--config.max_steps=2").returncode == 0
  proc = run_train(tmp_path / "ft", override, f"--config.init_checkpoint={tmp_path / 'base'}",
                   "--config.data.lom_radius_zyx=(3,3,3)")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "init_checkpoint" in lines[0] and text in lines[0], proc.stderr
  assert not (tmp_path / "ft" / "checkpoints").exists() or not list(
      (tmp_path / "ft" / "checkpoints").iterdir())


@pytest.mark.parametrize("make_path", [
    lambda tmp: tmp / "does_not_exist",
    lambda tmp: tmp,  # a folder without checkpoints
])
def test_bad_init_checkpoint_path_is_one_line_exit_2(tmp_path, make_path):
  (tmp_path / "empty").mkdir()
  path = make_path(tmp_path / "empty")
  proc = run_train(tmp_path / "ft", f"--config.init_checkpoint={path}")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: init_checkpoint"), proc.stderr


def test_finetuning_google_model_starts_at_its_loss(tmp_path):
  """The first logged loss of a fine-tuning run equals the pretrained model's loss on the same
  FIB-25 batch (within 0.1), far from a random init's: the weights really load."""
  import jax

  from ffn_jax import checkpoint, losses, parallel
  from ffn_jax.model import init_params
  from ffn_jax.training import data, state
  from bench._common import load_config
  ckpt = shared_data("google_ffn_fib25", "model.ckpt-27465036.index")
  shared_data("fib25_training_sample2", "labels.zarr")
  google = tmp_path / "google"
  proc = subprocess.run([sys.executable, "-m", "ffn_jax.import_tf_checkpoint",
                         str(ckpt)[:-len(".index")], "--out", str(google)],
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  overrides = ["--config.max_steps=1", "--config.log_every=1", "--config.eval.every_s=0",
               "--config.eval.at_start=false", "--config.data.box_size_zyx=(60,100,100)",
               "--config.model.conv_impl=auto", f"--config.init_checkpoint={google}"]
  proc = run_train(tmp_path / "ft", *overrides, config="configs/fib25_finetune.py", timeout=600)
  assert proc.returncode == 0, proc.stderr
  first = read_metrics(tmp_path / "ft")[0]["loss"]
  # The same first batch, scored with the imported parameters and with a fresh init.
  config = load_config("configs/fib25_finetune.py", overrides)
  examples = data.build_examples(config, parallel.Dist(), str(tmp_path / "ft"), lambda *a: None,
                                 config.batch_size)
  batch = examples.next_batch()
  model = state.build_model(config)
  params, _ = checkpoint.load_params(str(google))

  def loss(p):
    return float(losses.sigmoid_xent(model.apply({"params": p}, batch["image"], batch["seed"]),
                                     batch["labels"]))
  pretrained = loss(params)
  fresh = loss(init_params(model, jax.random.PRNGKey(0), config.model.fov_size_zyx))
  assert abs(first - pretrained) < 0.1, (first, pretrained)
  assert abs(fresh - pretrained) > 0.3, (fresh, pretrained)


# -- optimizers ------------------------------------------------------------------------------------
CUSTOM = ["--config.optim.name=custom",
          "--config.optim.factory=configs.optimizers:centralized_adam"]


def test_custom_optax_factory_trains_and_is_deterministic(tmp_path):
  runs = []
  for name in ("a", "b"):
    proc = run_train(tmp_path / name, "--config.max_steps=200", "--config.log_every=25",
                     "--config.batch_size=4", *CUSTOM)
    assert proc.returncode == 0, proc.stderr
    runs.append(read_metrics(tmp_path / name))
  steps = [r for r in runs[0] if "loss" in r]
  assert np.mean([r["loss"] for r in steps[-2:]]) < 0.8 * steps[0]["loss"], \
      [r["loss"] for r in steps]
  assert runs[0][-1]["params_fingerprint"] == runs[1][-1]["params_fingerprint"]


def test_custom_optimizer_under_two_ranks(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=10", *CUSTOM, ranks=2)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert len(set(read_metrics(tmp_path)[-1]["rank_fingerprints"])) == 1


def test_optimizer_passed_from_python(tmp_path):
  """``train_and_evaluate(config, workdir, optimizer=tx)`` trains with ``tx`` (reproducibility
  of custom optimizers: test_custom_optax_factory_trains_and_is_deterministic)."""
  script = (
      "import sys, optax\n"
      "from bench._common import load_config\n"
      "from ffn_jax.training import loop\n"
      "config = load_config('configs/tiny.py', ['--config.max_steps=40', '--config.log_every=10'])\n"
      "tx = lambda lr: optax.chain(optax.centralize(), optax.adabelief(lr))\n"
      "print(loop.train_and_evaluate(config, sys.argv[1], optimizer=tx)['params_fingerprint'])\n")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a")], cwd=REPO,
                        env=cli_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  fingerprint = proc.stdout.strip().splitlines()[-1]
  assert len(fingerprint) == 64
  plain = run_train(tmp_path / "adam", "--config.max_steps=40")
  assert plain.returncode == 0, plain.stderr
  final = read_metrics(tmp_path / "adam")[-1]
  assert final["final"] and final["step"] == 40 and len(final["params_fingerprint"]) == 64
  assert final["params_fingerprint"] != fingerprint  # the optimizer passed in is the one used
