"""Every shipped config runs as shipped, shrunk only in time and data: each training config
trains two steps (and evaluates once) on a small box of its own data through train.py, each
inference config segments a small box through infer.py with a checkpoint of its geometry.

A config file that is in neither list fails ``test_every_config_is_covered``: new configs get a
run here.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, read_metrics, run_train, shared_data

pytestmark = pytest.mark.slow

# name -> overrides that shrink a run to seconds: a small training box, a small eval box, two
# steps. The model, optimizer, schedule and data settings stay the config's own.
_SHORT = ("--config.max_steps=2", "--config.log_every=1", "--config.checkpoint_every=2",
          "--config.eval.every_steps=2", "--config.eval.every_s=0",
          "--config.eval.inference.min_segment_size=10")
TRAIN = {
    "tiny": (),
    "synthetic": ("--config.data.synthetic_shape_zyx=(32,48,48)",
                  "--config.data.synthetic_objects=8"),
    "demo": ("--config.data.synthetic_shape_zyx=(32,48,48)",),
    "gala": ("--config.data.box_size_zyx=(30,60,60)", "--config.eval.box_size_zyx=(20,30,30)"),
    "gala_finetune": ("--config.data.box_size_zyx=(50,60,60)",
                      "--config.eval.box_size_zyx=(36,40,40)", "--config.eval.at_start=False"),
    "fib25": ("--config.data.box_size_zyx=(50,60,60)", "--config.eval.box_size_zyx=(44,44,44)"),
    "fib25_small": ("--config.data.box_size_zyx=(40,60,60)",
                    "--config.eval.box_size_zyx=(24,24,24)"),
    "fib25_finetune": ("--config.data.box_size_zyx=(50,60,60)",
                       "--config.eval.box_size_zyx=(44,44,44)", "--config.eval.at_start=False"),
}
# name -> (the training config whose checkpoint it reads, overrides)
INFER = {
    "synthetic_infer": ("synthetic", ("--config.synthetic.shape_zyx=(32,48,48)",
                                      "--config.synthetic.objects=8")),
    "gala_infer": ("gala", ("--config.bbox_size_zyx=(20,40,40)",)),
    "fib25_infer": ("google", ("--config.bbox_start_zyx=(125,150,0)",
                               "--config.bbox_size_zyx=(44,44,44)")),
}
NOT_RUNNABLE = {"__init__", "optimizers"}  # a package marker; optimizer factories (test_optim)
_NEEDS_DATA = {"gala": "gala_train", "gala_finetune": "gala_train", "fib25": "fib25_training_sample2",
               "fib25_small": "fib25_training_sample2", "fib25_finetune": "fib25_training_sample2"}


def test_every_config_is_covered():
  shipped = {p.stem for p in (REPO / "configs").glob("*.py")}
  assert shipped == set(TRAIN) | set(INFER) | NOT_RUNNABLE



@pytest.mark.parametrize("name", sorted(TRAIN))
def test_no_config_calibrates_on_test_data(name):
  """End-of-run calibration tunes flood settings on the eval box: never a test volume (gala_test,
  FIB-25 z >= 125; ../shared/data/README.md)."""
  import importlib
  c = importlib.import_module(f"configs.{name}").get_config()
  if not c.eval.calibrate:
    return
  image = c.eval.image or c.data.image
  assert "gala_test" not in image, name
  if "fib25" in image:
    start, size = tuple(c.eval.box_start_zyx), tuple(c.eval.box_size_zyx)
    assert size and start[0] + size[0] <= 125, (name, start, size)

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """name -> workdir of that training config's short run (each run once, on first use)."""
  runs = {}

  def get(name, request):
    if name not in runs:
      if name in _NEEDS_DATA:
        shared_data(_NEEDS_DATA[name])
      extra = ()
      if name.endswith("_finetune"):
        extra = (f"--config.init_checkpoint={request.getfixturevalue('google_checkpoint')}",)
      workdir = tmp_path_factory.mktemp(name) / "w"
      proc = run_train(workdir, *_SHORT, *TRAIN[name], *extra, config=f"configs/{name}.py",
                       timeout=600)
      runs[name] = (workdir, proc)
    return runs[name]
  return get


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_training_config_trains_and_evaluates(name, trained, request):
  workdir, proc = trained(name, request)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = read_metrics(workdir)
  steps = [r for r in records if "loss" in r and not r.get("eval") and not r.get("final")]
  evals = [r for r in records if r.get("eval")]
  assert [r["step"] for r in steps] == [1, 2]
  assert all(r["loss"] > 0 for r in steps)
  assert evals and evals[-1]["step"] == 2 and evals[-1]["vi"] >= 0
  assert evals[-1]["fov_calls"] > 0  # the eval box is large enough to place seeds
  assert records[-1]["final"] and records[-1]["step"] == 2
  assert (workdir / "checkpoints").is_dir()


@pytest.mark.parametrize("name", sorted(INFER))
def test_inference_config_segments_a_box(name, trained, request, tmp_path):
  source, extra = INFER[name]
  if source == "google":
    checkpoint = request.getfixturevalue("google_checkpoint")
    shared_data("fib25_training_sample2", "image.zarr")
  else:
    if source in _NEEDS_DATA:
      shared_data("gala_test")
    checkpoint, proc = trained(source, request)
    assert proc.returncode == 0, proc.stderr[-3000:]
  proc = subprocess.run(
      [sys.executable, "infer.py", "--config", f"configs/{name}.py", "--workdir",
       str(tmp_path / "seg"), f"--config.checkpoint={checkpoint}",
       "--config.progress_interval_s=-1", *extra],
      cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  counters = json.loads((tmp_path / "seg" / "counters.json").read_text())
  assert counters["fov_calls"] > 0
  assert (tmp_path / "seg" / "segmentation.zarr").is_dir()
