"""Shared test helpers: repo paths, the shared data folder, running the CLIs in subprocesses."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FFN_SHARED_DATA", REPO.parent / "shared" / "data"))
BIN = Path(sys.executable).parent


def load_bench(name: str):
  """The script ``bench/<name>.py`` as a module (bench/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shared_data(*parts) -> Path:
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"shared data not available: {path} (set FFN_SHARED_DATA)")
  return path


def cli_env(**extra) -> dict:
  env = dict(os.environ)
  env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
  env.setdefault("PYTHONUNBUFFERED", "1")
  for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "FFN_JAX_MPI"):
    env.pop(k, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_train(workdir, *overrides, config="configs/tiny.py", ranks=None, env=None, timeout=300):
  """Runs train.py (under mpirun -n ranks if given); returns the CompletedProcess."""
  cmd = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / config),
         "--workdir", str(workdir), *overrides]
  if ranks:
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if mpirun is None:
      pytest.skip("mpirun not found (install the mpich wheel into the venv)")
    cmd = [mpirun, "-n", str(ranks), *cmd]
  return subprocess.run(cmd, cwd=REPO, env=env or cli_env(), capture_output=True, text=True,
                        timeout=timeout)


def read_metrics(workdir) -> list[dict]:
  with open(Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_infer_assets(root: Path, size: int) -> tuple[str, str]:
  """A smooth random uint8 image of ``size``^3 and a tiny FFN checkpoint (depth 2, 4 features,
  FOV 9^3, a positive output bias so that it floods) for inference tests: (image, checkpoint)."""
  import jax
  import numpy as np
  from scipy import ndimage

  from ffn_jax import checkpoint, model
  from ffn_jax.data import volumes
  rng = np.random.default_rng(0)
  image = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 2.0)
  image = np.clip(128 + image / image.std() * 30, 0, 255).astype(np.uint8)
  image_path = os.path.join(root, "image.zarr")
  volumes.write_zarr(image_path, image)
  net = model.FFN(depth=2, features=4)
  params = jax.tree_util.tree_map(np.asarray,
                                  model.init_params(net, jax.random.PRNGKey(0), (9, 9, 9)))
  params["conv_lom"]["bias"] = np.array([3.5], np.float32)
  ckpt = os.path.join(root, "ckpt")
  checkpoint.save_params(ckpt, params, meta={
      "model": {"depth": 2, "features": 4, "fov_size_zyx": [9, 9, 9], "deltas_zyx": [3, 3, 3]},
      "image_mean": 128.0, "image_stddev": 33.0})
  return image_path, ckpt
