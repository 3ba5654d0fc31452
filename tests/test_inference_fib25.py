"""Google's pretrained FIB-25 model, imported without TensorFlow, segments crop c64 of
training_sample2 as well as Google's TensorFlow code does (VI 1.763 bits, 67 FOV calls), with
the README's "Inference and evaluation" commands run exactly as written."""
import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA, cli_env, shared_data
from ffn_jax import evaluation
from ffn_jax.data import volumes

TF_VI_C64 = 1.763  # Google's TF inference on c64 on this machine (issue #4)


def readme_commands(section: str) -> list[list[str]]:
  """The commands of the first bash block under README heading ``section``, as argv lists."""
  text = (REPO / "README.md").read_text()
  body = text.split(f"\n## {section}\n", 1)[1]
  block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
  commands = []
  for line in block.replace("\\\n", " ").splitlines():
    argv = shlex.split(line, comments=True)
    if argv:
      commands.append(argv)
  return commands


@pytest.mark.slow
def test_readme_infer_then_evaluate_c64_matches_tensorflow(tmp_path):
  shared_data("google_ffn_fib25", "model.ckpt-27465036.index")
  labels = shared_data("fib25_training_sample2", "labels.zarr")
  commands = readme_commands("Inference and evaluation")
  assert [c[:2] for c in commands] == [
      ["python", "-m"], ["python", "infer.py"], ["python", "-m"]], commands
  outputs = []
  for argv in commands:
    # As written, with this checkout's shared data and outputs under tmp_path.
    argv = [sys.executable if a == "python" else
            a.replace("../shared/data", str(SHARED_DATA)).replace("runs/", f"{tmp_path}/runs/")
            for a in argv]
    proc = subprocess.run(argv, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{argv}\n{proc.stderr}"
    outputs.append(proc.stdout)
  out = tmp_path / "runs" / "c64"
  counters = json.loads((out / "counters.json").read_text())
  assert counters["fov_calls"] == 67
  scored = json.loads(outputs[-1])
  assert scored["bbox_start_zyx"] == [93, 93, 93] and scored["bbox_size_zyx"] == [64, 64, 64]
  assert scored["vi"] <= TF_VI_C64 + 5e-4, scored
  # The evaluate CLI scored the same box as a direct comparison does.
  seg = volumes.open_volume(str(out / "segmentation.zarr")).read()
  truth = volumes.open_volume(str(labels)).read((93, 93, 93), (64, 64, 64))
  assert scored["vi"] == pytest.approx(evaluation.evaluate_segmentation(seg, truth)["vi"])
  assert (out / "preview.png").stat().st_size > 0
