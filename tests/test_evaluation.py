"""VI and adapted Rand error on hand-computed cases, option semantics, and the evaluate CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffn_jax import evaluation
from ffn_jax.data import volumes
from ffn_jax.errors import UserError

from conftest import REPO, shared_data


def _h(p: float) -> float:
  """Binary entropy in bits."""
  return 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def _from_table(table_PT) -> tuple[np.ndarray, np.ndarray]:
  """Label arrays (pred IDs 1.., truth IDs 1..) whose contingency table is ``table_PT``."""
  pred, truth = [], []
  for i, row in enumerate(table_PT):
    for j, n in enumerate(row):
      pred += [i + 1] * n
      truth += [j + 1] * n
  return np.array(pred, np.uint32).reshape(1, 1, -1), np.array(truth, np.uint32).reshape(1, 1, -1)


# ---------------------------------------------------------------------- hand-computed cases
def test_identical_up_to_relabelling_is_perfect():
  truth = np.random.default_rng(0).integers(1, 6, (4, 5, 6)).astype(np.uint32)
  pred = (truth * 7 + 100).astype(np.uint64)  # different IDs, same partition
  m = evaluation.evaluate_segmentation(pred, truth)
  assert m["vi"] == pytest.approx(0, abs=1e-12) and m["are"] == pytest.approx(0, abs=1e-12)
  assert m["are_precision"] == m["are_recall"] == 1.0
  assert m["segments_pred"] == m["segments_truth"] == 5 and m["voxels"] == truth.size
  assert m["fraction_labelled"] == 1.0


def test_split_costs_one_bit_and_lowers_recall():
  truth = np.ones((2, 2, 2), np.uint32)
  pred = truth.copy()
  pred[1] = 2  # one truth segment split into two equal halves
  m = evaluation.evaluate_segmentation(pred, truth)
  assert m["vi_split"] == pytest.approx(1.0) and m["vi_merge"] == pytest.approx(0.0, abs=1e-12)
  assert m["vi"] == pytest.approx(1.0)
  # sum n^2 = 32, sum s^2 = 32, sum t^2 = 64: P = 1, R = 1/2, F1 = 2/3.
  assert m["are_precision"] == pytest.approx(1.0) and m["are_recall"] == pytest.approx(0.5)
  assert m["are"] == pytest.approx(1 / 3)
  # The merge is the mirror image.
  m2 = evaluation.evaluate_segmentation(truth, pred)
  assert m2["vi_merge"] == pytest.approx(1.0) and m2["vi_split"] == pytest.approx(0.0, abs=1e-12)
  assert m2["are_precision"] == pytest.approx(0.5) and m2["are_recall"] == pytest.approx(1.0)
  assert m2["are"] == pytest.approx(1 / 3)


def test_worked_two_by_two_table():
  # Rows: prediction segments, columns: truth segments.
  pred, truth = _from_table([[3, 1], [0, 4]])
  m = evaluation.evaluate_segmentation(pred, truth)
  # H(pred|truth): truth 1 is pure, truth 2 (5 voxels) splits 1:4.
  assert m["vi_split"] == pytest.approx(5 / 8 * _h(1 / 5))
  # H(truth|pred): pred 1 (4 voxels) mixes 3:1, pred 2 is pure.
  assert m["vi_merge"] == pytest.approx(4 / 8 * _h(1 / 4))
  # sum n^2 = 26, sum s^2 = 4^2 + 4^2 = 32, sum t^2 = 3^2 + 5^2 = 34.
  assert m["are_precision"] == pytest.approx(26 / 32)
  assert m["are_recall"] == pytest.approx(26 / 34)
  assert m["are"] == pytest.approx(7 / 33)  # 1 - F1, F1 = 2PR / (P + R) = 26/33


def test_split_objects_and_split_anew_count_objects_cut_in_pieces():
  """Truth: four slabs of 2,000 voxels (ids 1-4). The reference keeps 1 and 3 whole, cuts 2 and
  merges 3 with 4; seg cuts 1 and 2 and a 5 % sliver off 3 (below min_part: not a cut)."""
  truth = np.repeat(np.arange(1, 5, dtype=np.uint32), 20)[:, None, None] * np.ones((1, 10, 10),
                                                                                  np.uint32)
  reference = truth.copy()
  reference[20:30] = 9      # 2 cut in half
  reference[60:80] = 3      # 4 merged into 3
  seg = truth.copy()
  seg[0:10] = 7             # 1 cut in half
  seg[20:30] = 8            # 2 cut in half
  seg[40, :, :] = 6         # a 5 % sliver of 3
  assert evaluation.split_objects(truth, reference) == 1          # 2
  assert evaluation.split_objects(truth, seg) == 2                # 1 and 2
  assert evaluation.split_objects(reference, truth) == 1          # reference's 3 spans 3 and 4
  # Kept whole by the reference, cut by seg: 1 only (2 was cut by both; 3's sliver is small).
  assert evaluation.split_anew(truth, reference, seg) == 1
  assert evaluation.split_anew(truth, seg, reference) == 0
  assert evaluation.split_anew(truth, reference, seg, min_size=2001) == 0


def test_contingency_table_handles_wide_and_negative_ids():
  rng = np.random.default_rng(1)
  truth = rng.integers(0, 4, (3, 4, 5))
  pred = rng.integers(0, 3, (3, 4, 5))
  # The same partitions under IDs >= 2**32 and negative IDs (no 0 among them).
  wide = evaluation.evaluate_segmentation(pred.astype(np.uint64) + (1 << 40),
                                          truth.astype(np.int64) * -5 - 1)
  base = evaluation.evaluate_segmentation(pred + 1, truth + 1)
  for key in ("vi", "vi_split", "vi_merge", "are", "are_precision", "are_recall"):
    assert wide[key] == pytest.approx(base[key]), key
  p_ids, t_ids, counts = evaluation.contingency_table(pred.astype(np.uint64) + (1 << 40), truth)
  assert p_ids.min() >= 1 << 40 and counts.sum() == truth.size
  np.testing.assert_array_equal(np.sort(np.unique(t_ids)), np.unique(truth))


# -------------------------------------------------------------------------- option semantics
def _pair():
  rng = np.random.default_rng(2)
  truth = rng.integers(0, 4, (6, 7, 8)).astype(np.uint32)
  pred = rng.integers(0, 5, (6, 7, 8)).astype(np.uint32)
  return pred, truth


def test_truth_zero_ignore_equals_evaluating_the_nonzero_voxels():
  pred, truth = _pair()
  keep = truth != 0
  m = evaluation.evaluate_segmentation(pred, truth)  # default: truth_zero="ignore"
  sub = evaluation.evaluate_segmentation(pred[keep][None, None], truth[keep][None, None],
                                         truth_zero="as-segment")
  for key in ("vi", "vi_split", "vi_merge", "are", "voxels", "fraction_labelled"):
    assert m[key] == pytest.approx(sub[key]), key
  assert m["voxels"] == int(keep.sum()) and m["truth_zero"] == "ignore"
  full = evaluation.evaluate_segmentation(pred, truth, truth_zero="as-segment")
  assert full["voxels"] == truth.size and full["vi"] != pytest.approx(m["vi"])


def test_pred_unlabelled_modes():
  pred, truth = _pair()
  keep = truth != 0
  p, t = pred[keep], truth[keep]
  as_segment = evaluation.evaluate_segmentation(pred, truth)
  assert as_segment["pred_unlabelled"] == "as-segment"
  assert as_segment["fraction_labelled"] == pytest.approx(np.mean(p != 0))
  # "as-segment": 0 is an ordinary ID, so renaming it changes nothing.
  renamed = evaluation.evaluate_segmentation(np.where(pred == 0, 99, pred), truth)
  assert renamed["vi"] == pytest.approx(as_segment["vi"])
  assert renamed["are"] == pytest.approx(as_segment["are"])
  # "ignore": the same as leaving the pred-0 voxels out.
  ignored = evaluation.evaluate_segmentation(pred, truth, pred_unlabelled="ignore")
  sub = evaluation.evaluate_segmentation(p[p != 0][None, None], t[p != 0][None, None])
  for key in ("vi", "are", "are_precision", "are_recall", "voxels"):
    assert ignored[key] == pytest.approx(sub[key]), key
  assert ignored["fraction_labelled"] == pytest.approx(as_segment["fraction_labelled"])
  # "singletons": the same as giving every pred-0 voxel a fresh ID of its own.
  singles = evaluation.evaluate_segmentation(pred, truth, pred_unlabelled="singletons")
  fresh = p.astype(np.int64)
  fresh[p == 0] = 1000 + np.arange(np.sum(p == 0))
  explicit = evaluation.evaluate_segmentation(fresh[None, None], t[None, None])
  for key in ("vi", "vi_split", "vi_merge", "are", "are_precision", "are_recall", "voxels"):
    assert singles[key] == pytest.approx(explicit[key]), key


def test_bad_input_is_user_error():
  a = np.ones((2, 2, 2), np.uint32)
  with pytest.raises(UserError, match="integer"):
    evaluation.evaluate_segmentation(a.astype(np.float32), a)
  with pytest.raises(UserError, match="shape"):
    evaluation.evaluate_segmentation(a, np.ones((2, 2, 3), np.uint32))
  with pytest.raises(UserError, match="no voxels"):
    evaluation.evaluate_segmentation(a, np.zeros_like(a))
  with pytest.raises(UserError, match="pred_unlabelled"):
    evaluation.evaluate_segmentation(a, a, pred_unlabelled="drop")


# ------------------------------------------------------------------------------------- CLI
def _run_cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("FFN_JAX_TRACEBACK", None)
  return subprocess.run([sys.executable, "-m", "ffn_jax.evaluate", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def zarrs(tmp_path):
  pred, truth = _pair()
  volumes.write_zarr(str(tmp_path / "pred.zarr"), pred, chunks=(4, 4, 4))
  volumes.write_zarr(str(tmp_path / "truth.zarr"), truth, chunks=(4, 4, 4))
  return tmp_path, pred, truth


def test_cli_whole_volume_and_box(zarrs):
  tmp_path, pred, truth = zarrs
  proc = _run_cli("--segmentation", tmp_path / "pred.zarr", "--truth", tmp_path / "truth.zarr")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  want = evaluation.evaluate_segmentation(pred, truth)
  for key, value in want.items():
    assert out[key] == pytest.approx(value), key
  assert out["bbox_start_zyx"] == [0, 0, 0] and out["bbox_size_zyx"] == [6, 7, 8]

  proc = _run_cli("--segmentation", tmp_path / "pred.zarr", "--truth", tmp_path / "truth.zarr",
                  "--bbox-start-zyx", "1,2,3", "--bbox-size-zyx", "4,4,4",
                  "--pred-unlabelled", "singletons", "--truth-zero", "as-segment")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  want = evaluation.evaluate_segmentation(pred[1:5, 2:6, 3:7], truth[1:5, 2:6, 3:7],
                                          pred_unlabelled="singletons", truth_zero="as-segment")
  for key, value in want.items():
    assert out[key] == pytest.approx(value), key
  assert out["voxels"] == 64 and out["bbox_start_zyx"] == [1, 2, 3]


def test_cli_scores_a_segmentation_of_just_the_box(zarrs):
  """infer.py writes the bbox only: with --bbox-*, its shape = the box size selects the truth's
  box (the README's infer -> evaluate flow)."""
  tmp_path, pred, truth = zarrs
  volumes.write_zarr(str(tmp_path / "box.zarr"), pred[1:5, 2:6, 3:7])
  proc = _run_cli("--segmentation", tmp_path / "box.zarr", "--truth", tmp_path / "truth.zarr",
                  "--bbox-start-zyx", "1,2,3", "--bbox-size-zyx", "4,4,4")
  assert proc.returncode == 0, proc.stderr
  want = evaluation.evaluate_segmentation(pred[1:5, 2:6, 3:7], truth[1:5, 2:6, 3:7])
  assert json.loads(proc.stdout)["vi"] == pytest.approx(want["vi"])
  proc = _run_cli("--segmentation", tmp_path / "box.zarr", "--truth", tmp_path / "truth.zarr",
                  "--bbox-start-zyx", "1,2,3", "--bbox-size-zyx", "4,4,3")
  assert proc.returncode == 2 and "--bbox-size-zyx" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_crops_the_truth_to_a_recorded_offset(zarrs):
  """A segmentation that records offset_zyx (infer.py's) needs no --bbox-*; a --bbox-* narrows
  it, in truth coordinates, and must lie inside it."""
  tmp_path, pred, truth = zarrs
  volumes.write_zarr(str(tmp_path / "box.zarr"), pred[1:5, 2:6, 3:7],
                     attrs={"offset_zyx": [1, 2, 3]})
  assert volumes.open_volume(str(tmp_path / "box.zarr")).offset_zyx() == (1, 2, 3)
  args = ("--segmentation", tmp_path / "box.zarr", "--truth", tmp_path / "truth.zarr")
  proc = _run_cli(*args)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  want = evaluation.evaluate_segmentation(pred[1:5, 2:6, 3:7], truth[1:5, 2:6, 3:7])
  assert out["vi"] == pytest.approx(want["vi"]) and out["voxels"] == want["voxels"]
  assert out["bbox_start_zyx"] == [1, 2, 3] and out["bbox_size_zyx"] == [4, 4, 4]

  proc = _run_cli(*args, "--bbox-start-zyx", "2,3,4", "--bbox-size-zyx", "2,2,3")
  assert proc.returncode == 0, proc.stderr
  want = evaluation.evaluate_segmentation(pred[2:4, 3:5, 4:7], truth[2:4, 3:5, 4:7])
  assert json.loads(proc.stdout)["vi"] == pytest.approx(want["vi"])
  proc = _run_cli(*args, "--bbox-start-zyx", "2,3,4")  # to the end of the recorded box
  assert proc.returncode == 0 and json.loads(proc.stdout)["bbox_size_zyx"] == [3, 3, 3]

  for extra in (("--bbox-start-zyx", "0,2,3"), ("--bbox-start-zyx", "1,2,3",
                                                 "--bbox-size-zyx", "4,4,5")):
    proc = _run_cli(*args, *extra)
    assert proc.returncode == 2 and "recorded offset_zyx" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("offset", [[3, 2, 3], [0, 0, -1], [1, 2]])
def test_cli_recorded_box_outside_the_truth_is_one_line_error(zarrs, offset):
  tmp_path, pred, _ = zarrs
  volumes.write_zarr(str(tmp_path / "box.zarr"), pred[1:5, 2:6, 3:7],
                     attrs={"offset_zyx": offset})
  proc = _run_cli("--segmentation", tmp_path / "box.zarr", "--truth", tmp_path / "truth.zarr")
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "offset_zyx" in lines[0]


def test_cli_reads_hdf5(tmp_path):
  import h5py
  pred, truth = _pair()
  with h5py.File(tmp_path / "v.h5", "w") as f:
    f["pred"], f["truth"] = pred, truth
  proc = _run_cli("--segmentation", f"{tmp_path / 'v.h5'}:pred", "--truth",
                  f"{tmp_path / 'v.h5'}:truth")
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["vi"] == pytest.approx(
      evaluation.evaluate_segmentation(pred, truth)["vi"])


@pytest.mark.parametrize("case", ["shape", "missing", "bbox", "float", "bbox_format"])
def test_cli_bad_input_one_line_exit_2(zarrs, case):
  tmp_path, pred, _ = zarrs
  seg, truth = tmp_path / "pred.zarr", tmp_path / "truth.zarr"
  extra = []
  if case == "shape":
    volumes.write_zarr(str(tmp_path / "small.zarr"), pred[:5])
    truth = tmp_path / "small.zarr"
  elif case == "missing":
    seg = tmp_path / "nope.zarr"
  elif case == "bbox":
    extra = ["--bbox-start-zyx", "2,2,2", "--bbox-size-zyx", "5,5,5"]
  elif case == "float":
    volumes.write_zarr(str(tmp_path / "float.zarr"), pred.astype(np.float32))
    seg = tmp_path / "float.zarr"
  else:
    extra = ["--bbox-start-zyx", "1,2"]
  proc = _run_cli("--segmentation", seg, "--truth", truth, *extra)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert proc.stdout == ""
  expected = {"shape": "shape", "missing": "not found", "bbox": "outside",
              "float": "integer", "bbox_format": "Z,Y,X"}[case]
  assert expected in lines[0]


# -------------------------------------------------------------------------------- real data
def test_official_google_segmentation_on_c64():
  """Google's published segmentation on c64, pinned: VI 0.8392 (split 0.5748, merge 0.2644),
  ARE 0.0613, 33 segments over 21 neurons, 95.57 % labelled; ERL 2,046 of 2,660 nm on 11
  skeletons (kimimaro 5.8), no merge, 4 splits (docs/quality.md uses these)."""
  seg = shared_data("google_ffn_fib25", "official_segmentation_training_sample2.zarr")
  truth = shared_data("fib25_training_sample2", "labels.zarr")
  proc = _run_cli("--segmentation", seg, "--truth", truth, "--voxel-size-zyx", "10,10,10",
                  "--bbox-start-zyx", "93,93,93", "--bbox-size-zyx", "64,64,64")
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert out["vi"] == pytest.approx(0.839156, abs=1e-5)
  assert out["vi_split"] == pytest.approx(0.574801, abs=1e-5)
  assert out["vi_merge"] == pytest.approx(0.264356, abs=1e-5)
  assert out["are"] == pytest.approx(0.061337, abs=1e-5)
  assert (out["segments_pred"], out["segments_truth"], out["voxels"]) == (33, 21, 64 ** 3)
  assert out["fraction_labelled"] == pytest.approx(0.955681, abs=1e-5)
  assert out["erl"] == pytest.approx(2045.95, rel=1e-4)
  assert out["erl_max"] == pytest.approx(2659.16, rel=1e-4)
  assert out["erl_voxels"] == pytest.approx(out["erl"] / 10)
  assert out["skeleton_length"] == pytest.approx(12668.96, rel=1e-4)
  assert (out["skeletons"], out["merges"], out["splits"]) == (11, 0, 4)
  assert out["omitted"] == pytest.approx(0.0630, abs=1e-4)
