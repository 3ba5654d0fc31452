"""Google's TF FFN checkpoint imported without TensorFlow reproduces TF's logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from ffn_jax import checkpoint as checkpoint_lib
from ffn_jax import import_tf_checkpoint as itc
from ffn_jax.tf_bundle import crc as tf_crc
from ffn_jax.tf_bundle import snappy as tf_snappy
from ffn_jax import model as model_lib
from ffn_jax.errors import UserError
from ffn_jax.ops import onednn

from conftest import REPO, SHARED_DATA, shared_data

FIB25 = SHARED_DATA / "google_ffn_fib25"
CKPT = FIB25 / "model.ckpt-27465036"


@pytest.fixture
def _google_checkpoint():
  """Skips (fails in CI) where Google's FIB-25 checkpoint is absent."""
  for suffix in (".index", ".data-00000-of-00001"):
    shared_data("google_ffn_fib25", CKPT.name + suffix)


needs_ckpt = pytest.mark.usefixtures("_google_checkpoint")


@pytest.fixture(scope="module")
def imported():
  return itc.import_checkpoint(str(CKPT))


def _run_cli(*args, timeout=120):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("FFN_JAX_TRACEBACK", None)
  return subprocess.run([sys.executable, "-m", "ffn_jax.import_tf_checkpoint", *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ format pieces, no data
def test_crc32c_check_value_and_chunked_path():
  assert tf_crc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert tf_crc.crc32c(b"") == 0
  data = np.random.default_rng(0).integers(0, 256, 70_001, dtype=np.uint8).tobytes()
  # Against a byte-at-a-time reference: covers the head bytes and the chunk-combining path.
  for n in (255, 256, 257, 5_000, 70_001):
    crc = 0xFFFFFFFF
    for b in data[:n]:
      crc = tf_crc._CRC_TABLE_LIST[(crc ^ b) & 0xFF] ^ (crc >> 8)
    assert tf_crc.crc32c(data[:n]) == crc ^ 0xFFFFFFFF, n
  assert tf_crc.crc32c(data) != zlib.crc32(data)  # Castagnoli, not the zlib polynomial


def test_snappy_literal_and_overlapping_copy():
  # "abc" literal, copy 9 bytes from offset 3 (overlaps itself), "X" literal.
  block = bytes([13, (3 - 1) << 2]) + b"abc" + bytes([((9 - 4) << 2) | 1, 3, 0]) + b"X"
  assert tf_snappy.decompress(block) == b"abcabcabcabcX"


def test_missing_checkpoint_is_user_error(tmp_path):
  with pytest.raises(UserError, match="not found"):
    itc.BundleReader(str(tmp_path / "model.ckpt-1"))


# ----------------------------------------------------------------------- the real checkpoint
@needs_ckpt
def test_bundle_lists_exactly_the_reference_variables():
  listing = json.loads((FIB25 / "checkpoint_variables.json").read_text())["variables"]
  reader = itc.BundleReader(str(CKPT) + ".index")  # the .index path works as well as the prefix
  got = reader.variables()
  assert len(got) == len(listing) == 54
  assert got == {v["name"]: (tuple(v["shape"]), v["dtype"]) for v in listing}
  tensors = reader.read_all()
  for v in listing:
    assert tensors[v["name"]].shape == tuple(v["shape"])
    assert tensors[v["name"]].dtype == np.dtype(v["dtype"])
  assert int(tensors["global_step"]) == 27465036


@needs_ckpt
def test_params_match_ffn_depth12(imported):
  params, meta = imported
  assert model_lib.count_params(params) == 638_433
  expected = jax.eval_shape(lambda: model_lib.init_params(
      model_lib.FFN(depth=12), jax.random.PRNGKey(0), (33, 33, 33)))
  assert (jax.tree_util.tree_structure(params)
          == jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, expected)))
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
    assert got.shape == want.shape and got.dtype == want.dtype
  assert meta == {
      "model": {"depth": 12, "features": 32, "fov_size_zyx": [33, 33, 33],
                "deltas_zyx": [8, 8, 8]},
      "image_mean": 128, "image_stddev": 33, "source": str(CKPT), "global_step": 27465036}


@pytest.mark.slow
@needs_ckpt
@pytest.mark.parametrize("conv_impl", [
    "xla", "im2col_kz",
    pytest.param("onednn", marks=pytest.mark.skipif(
        not onednn.available(), reason=f"oneDNN route unavailable: {onednn.unavailable_reason()}"))])
def test_reproduces_tensorflow_logits(imported, conv_impl):
  params, _ = imported
  ref = np.load(FIB25 / "reference_logits.npz")
  # Cases A, B, C (first step of a new segment) and A's second step (seed = logits_A), one batch.
  cases = [("A", "seed_A", "logits_A", "update_A"), ("B", "seed_B", "logits_B", "update_B"),
           ("C", "seed_C", "logits_C", "update_C"),
           ("A", "logits_A", "logits_A_step2", "update_A_step2")]
  image_BZYX1 = np.stack([ref[f"image_{c}"] for c, *_ in cases]).astype(np.float32)[..., None]
  image_BZYX1 = (image_BZYX1 - 128.0) / 33.0
  seed_BZYX1 = np.stack([ref[s] for _, s, _, _ in cases]).astype(np.float32)[..., None]
  model = model_lib.FFN(depth=12, conv_impl=conv_impl)
  with jax.default_matmul_precision("highest"):
    logits_BZYX1 = np.asarray(jax.jit(model.apply)({"params": params}, image_BZYX1, seed_BZYX1))
  for b, (_, _, logits_key, update_key) in enumerate(cases):
    np.testing.assert_allclose(logits_BZYX1[b, ..., 0], ref[logits_key], rtol=0, atol=1e-4,
                               err_msg=logits_key)
    update_ZYX = logits_BZYX1[b, ..., 0] - seed_BZYX1[b, ..., 0]
    np.testing.assert_allclose(update_ZYX, ref[update_key], rtol=0, atol=1e-4, err_msg=update_key)


@needs_ckpt
def test_corrupt_or_truncated_files_are_user_errors(tmp_path):
  index = CKPT.with_name(CKPT.name + ".index").read_bytes()
  data = CKPT.with_name(CKPT.name + ".data-00000-of-00001").read_bytes()
  prefix = tmp_path / "model.ckpt-1"

  def write(index_bytes, data_bytes):
    Path(str(prefix) + ".index").write_bytes(index_bytes)
    Path(str(prefix) + ".data-00000-of-00001").write_bytes(data_bytes)

  write(index[:-10], data)
  with pytest.raises(UserError, match="index"):
    itc.BundleReader(str(prefix))
  flipped = bytearray(index)
  flipped[200] ^= 0xFF
  write(bytes(flipped), data)
  with pytest.raises(UserError, match="crc32c"):
    itc.BundleReader(str(prefix))
  write(index, data[:len(data) // 2])
  with pytest.raises(UserError, match="truncated"):
    itc.import_checkpoint(str(prefix))
  flipped = bytearray(data)
  flipped[1000] ^= 0x01
  write(index, bytes(flipped))
  with pytest.raises(UserError, match="crc32c"):
    itc.import_checkpoint(str(prefix))
  os.remove(str(prefix) + ".data-00000-of-00001")
  with pytest.raises(UserError, match="not found"):
    itc.import_checkpoint(str(prefix))


# ------------------------------------------------------------------------------------- CLI
@needs_ckpt
def test_cli_round_trip(tmp_path, imported):
  out = tmp_path / "imported"
  proc = _run_cli(CKPT, "--out", out)
  assert proc.returncode == 0, proc.stderr
  assert "638,433 parameters" in proc.stdout
  params, meta = checkpoint_lib.load_params(str(out))
  want_params, want_meta = imported
  assert meta.pop("checkpoint_step") == 27465036  # load_params says which step it read
  assert meta == want_meta
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want_params)
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_cli_refuses_non_empty_out(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  proc = _run_cli(CKPT, "--out", out)
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
  assert "not an empty directory" in proc.stderr
  assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_cli_missing_checkpoint(tmp_path):
  proc = _run_cli(tmp_path / "no_such.ckpt-1", "--out", tmp_path / "out")
  assert proc.returncode == 2
  assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
  assert "not found" in proc.stderr
  assert not (tmp_path / "out").exists()

