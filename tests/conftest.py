"""Shared test helpers: repo paths, the shared data folder, running the CLIs in subprocesses."""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _xla_cache() -> None:
  """One persistent XLA compilation cache for this test session, in this process and every
  train.py / infer.py / bench subprocess (they inherit the environment): the many small runs
  compile the same steps, and a cache hit gives the same executable (7.5 s -> 2.6 s for a
  10-step tiny run). A fresh directory per session, so that timings are of a cold start;
  FFN_JAX_TEST_XLA_CACHE names a lasting one (and "off" turns the cache off)."""
  chosen = os.environ.get("FFN_JAX_TEST_XLA_CACHE", "")
  if chosen == "off" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  if not chosen:
    chosen = tempfile.mkdtemp(prefix="ffn_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, chosen, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = chosen
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


_xla_cache()  # before any test module imports jax
SHARED_DATA = Path(os.environ.get("FFN_SHARED_DATA", REPO.parent / "shared" / "data"))
BIN = Path(sys.executable).parent


def load_bench(name: str):
  """The script ``bench/<name>.py`` as a module (bench/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# CI sets FFN_JAX_TEST_STRICT=1: there, missing shared data or a missing mpirun fails the test
# instead of skipping it, so that a green run cannot hide the tests that need them.
STRICT = os.environ.get("FFN_JAX_TEST_STRICT") == "1"


def pytest_sessionstart(session):
  del session
  if STRICT and not SHARED_DATA.is_dir():
    pytest.exit(f"FFN_JAX_TEST_STRICT=1 but the shared data folder {SHARED_DATA} is missing "
                "(set FFN_SHARED_DATA)", returncode=3)


def skip_or_fail(reason: str):
  """Skips with ``reason``; under FFN_JAX_TEST_STRICT=1 (CI) fails instead."""
  if STRICT:
    pytest.fail(f"{reason} [FFN_JAX_TEST_STRICT=1: required here]", pytrace=False)
  pytest.skip(reason)


def shared_data(*parts) -> Path:
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    skip_or_fail(f"shared data not available: {path} (set FFN_SHARED_DATA)")
  return path


def mpirun() -> str:
  """The venv's mpirun (the mpich wheel's), else one on PATH; skips (fails in CI) without one."""
  path = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
  if path is None:
    skip_or_fail("mpirun not found (install the mpich wheel into the venv)")
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
    cmd = [mpirun(), "-n", str(ranks), *cmd]
  return subprocess.run(cmd, cwd=REPO, env=env or cli_env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
  """configs/tiny.py trained 30 steps by one process (checkpoints at 10, 20, 30), once per
  session, for every test that compares with an uninterrupted run or resumes from a copy of one.
  Read it or copy it; never write into it. Returns (workdir, final params_fingerprint)."""
  workdir = tmp_path_factory.mktemp("tiny_reference") / "w"
  proc = run_train(workdir, "--config.max_steps=30", "--config.checkpoint_every=10")
  assert proc.returncode == 0, proc.stderr
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [10, 20, 30]
  return workdir, read_metrics(workdir)[-1]["params_fingerprint"]


@pytest.fixture(scope="session")
def tiny_reference_2ranks(tmp_path_factory):
  """As ``tiny_reference``, trained by two MPI ranks (global batch 4)."""
  workdir = tmp_path_factory.mktemp("tiny_reference_2ranks") / "w"
  proc = run_train(workdir, "--config.max_steps=30", "--config.checkpoint_every=10", ranks=2)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  final = read_metrics(workdir)[-1]
  assert final["ranks"] == 2 and final["step"] == 30
  return workdir, final["params_fingerprint"]


@pytest.fixture(scope="session")
def google_checkpoint(tmp_path_factory):
  """Google's FIB-25 model imported as an ffn_jax checkpoint, once per session."""
  ckpt = shared_data("google_ffn_fib25", "model.ckpt-27465036.index")
  out = tmp_path_factory.mktemp("google") / "ckpt"
  proc = subprocess.run([sys.executable, "-m", "ffn_jax.import_tf_checkpoint",
                         str(ckpt.with_suffix("")), "--out", str(out)], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return out


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
