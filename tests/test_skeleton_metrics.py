"""Skeleton scores: ERL, merges, splits and omissions on hand-computed skeletons, the kimimaro
skeleton cache, and the evaluate CLI end to end on two tubes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ffn_jax import skeletons
from ffn_jax.data import volumes
from ffn_jax.errors import UserError
from ffn_jax.skeleton_metrics import Skeleton, evaluate_skeletons, skeleton_metrics

from conftest import REPO

VOXEL_SIZE = (2.0, 1.0, 1.0)  # z voxels twice as long: lengths must use physical units


def _line(label, y, z0, z1):
  """A straight skeleton along z at (y, x=1), nodes on voxels z0..z1, in physical units."""
  z = np.arange(z0, z1 + 1)
  vertices = np.stack([z * VOXEL_SIZE[0], np.full(len(z), y), np.ones(len(z))], 1)
  return Skeleton(label, vertices.astype(np.float32),
                  np.stack([np.arange(len(z) - 1), np.arange(1, len(z))], 1))


@pytest.fixture()
def two_lines():
  """Skeleton A: z 0..10 at y 1 (10 edges, 20 long); B: z 0..5 at y 4 (5 edges, 10 long)."""
  return [_line(1, 1, 0, 10), _line(2, 4, 0, 5)]


def _scores(seg, lines, **kw):
  return evaluate_skeletons(seg, lines, VOXEL_SIZE, **kw)


def test_perfect_segmentation_reaches_erl_max(two_lines):
  seg = np.zeros((11, 6, 3), np.uint32)
  seg[:, 1], seg[:, 4] = 7, 9
  m = _scores(seg, two_lines)
  # L = 30; ERL_max = (20^2 + 10^2) / 30.
  assert m["skeleton_length"] == pytest.approx(30)
  assert m["erl"] == m["erl_max"] == pytest.approx(500 / 30)
  assert m["erl_voxels"] == pytest.approx((10 ** 2 + 5 ** 2) / 15)  # z edges are 1 voxel long
  assert (m["merges"], m["splits"], m["omitted"], m["skeletons"]) == (0, 0, 0.0, 2)


def test_a_cut_splits_one_skeleton_into_two_runs(two_lines):
  seg = np.zeros((11, 6, 3), np.uint32)
  seg[:6, 1], seg[6:, 1], seg[:, 4] = 7, 8, 9  # A cut between nodes z=5 and z=6
  m = _scores(seg, two_lines)
  # A's runs: z 0..5 (10 long) and z 6..10 (8 long); the edge 5-6 is in neither. B: 10.
  assert m["erl"] == pytest.approx((10 ** 2 + 8 ** 2 + 10 ** 2) / 30)
  assert (m["merges"], m["splits"]) == (0, 1)
  assert m["erl_max"] == pytest.approx(500 / 30)
  # A piece of 4 nodes (< min_nodes=5) is no split, though its run still counts.
  seg[6, 1] = 7
  m = _scores(seg, two_lines)
  assert m["splits"] == 0
  assert m["erl"] == pytest.approx((12 ** 2 + 6 ** 2 + 10 ** 2) / 30)


def test_a_merge_zeroes_every_run_of_the_merged_segment(two_lines):
  seg = np.zeros((11, 6, 3), np.uint32)
  seg[:, 1], seg[:, 4] = 7, 7
  m = _scores(seg, two_lines)
  assert (m["erl"], m["merges"], m["splits"]) == (0.0, 1, 0)
  # The segment merges A's first 5 nodes with B; A's other part (z 5..10) keeps its run.
  seg[5:, 1] = 8
  m = _scores(seg, two_lines)
  assert (m["merges"], m["splits"]) == (1, 1)
  assert m["erl"] == pytest.approx(10 ** 2 / 30)
  # With min_nodes=6 A's 5 nodes in segment 7 no longer make it a merge (nor a split).
  m = _scores(seg, two_lines, min_nodes=6)
  assert (m["merges"], m["splits"]) == (0, 0)
  assert m["erl"] == pytest.approx((8 ** 2 + 10 ** 2 + 10 ** 2) / 30)


def test_unlabelled_nodes_break_runs_and_count_as_omitted(two_lines):
  seg = np.zeros((11, 6, 3), np.uint32)
  seg[:, 1], seg[:, 4] = 7, 9
  seg[5, 1] = 0  # A's middle node: its two edges (4 long) belong to no run
  seg[:, 4] = 0  # all of B
  m = _scores(seg, two_lines)
  assert m["erl"] == pytest.approx((8 ** 2 + 8 ** 2) / 30)
  # Half of each edge at an unlabelled node: 2 x 2 / 2 on A, all 10 of B.
  assert m["omitted"] == pytest.approx((2 + 10) / 30)
  assert (m["merges"], m["splits"]) == (0, 0)
  # A node of another segment breaks A's run the same way (one node: no split), not omitted.
  seg[5, 1] = 8
  m = _scores(seg, two_lines)
  assert m["erl"] == pytest.approx((8 ** 2 + 8 ** 2) / 30)
  assert (m["omitted"], m["splits"]) == (pytest.approx(10 / 30), 0)


def test_core_takes_node_segments_and_rejects_bad_input(two_lines):
  m = skeleton_metrics(two_lines, [np.full(11, 3), np.full(6, 3)], VOXEL_SIZE)
  assert (m["erl"], m["merges"]) == (0.0, 1)
  empty = skeleton_metrics([], [], VOXEL_SIZE)
  assert empty["erl"] is None and empty["skeleton_length"] == 0 and empty["merges"] == 0
  with pytest.raises(UserError, match="outside"):
    evaluate_skeletons(np.zeros((5, 6, 3), np.uint32), two_lines, VOXEL_SIZE)
  with pytest.raises(UserError, match="node segments"):
    skeleton_metrics(two_lines, [np.full(10, 3), np.full(6, 3)], VOXEL_SIZE)
  with pytest.raises(UserError, match="min_nodes"):
    skeleton_metrics(two_lines, [np.full(11, 3), np.full(6, 3)], VOXEL_SIZE, min_nodes=0)
  with pytest.raises(UserError, match="voxel size"):
    skeleton_metrics(two_lines, [np.full(11, 3), np.full(6, 3)], (1, 0, 1))


# ------------------------------------------------------------------------- kimimaro + cache
def _tubes():
  """Two straight 5x5-voxel tubes along z (labels 1 and 2, 0 around them), z 2..37."""
  labels = np.zeros((40, 24, 24), np.uint32)
  labels[2:38, 4:9, 4:9] = 1
  labels[2:38, 14:19, 14:19] = 2
  return labels


def test_skeletons_are_cached_by_content_and_parameters(tmp_path):
  labels = _tubes()
  params = skeletons.SkeletonParams(voxel_size_zyx=(10, 10, 10), dust_voxels=100)
  first, hit = skeletons.load_or_skeletonize(labels, params, tmp_path)
  assert not hit and [s.label for s in first] == [1, 2]
  # Nodes lie on their tube's voxels, in physical units, from one end of the tube to the other.
  for s in first:
    index = np.rint(s.vertices_zyx / 10).astype(int)
    assert np.all(labels[tuple(index.T)] == s.label)
    assert (index[:, 0].min(), index[:, 0].max()) == (2, 37)
  again, hit = skeletons.load_or_skeletonize(labels, params, tmp_path)
  assert hit and len(list(tmp_path.iterdir())) == 1
  for a, b in zip(first, again):
    assert a.label == b.label
    np.testing.assert_array_equal(a.vertices_zyx, b.vertices_zyx)
    np.testing.assert_array_equal(a.edges, b.edges)
  # Other labels or other parameters: another entry. The voxel size scales the nodes only.
  _, hit = skeletons.load_or_skeletonize(np.where(labels == 2, 3, labels), params, tmp_path)
  assert not hit
  coarse, hit = skeletons.load_or_skeletonize(
      labels, skeletons.SkeletonParams(voxel_size_zyx=(1, 1, 1), dust_voxels=100), tmp_path)
  assert not hit and len(list(tmp_path.iterdir())) == 3
  np.testing.assert_allclose(coarse[0].vertices_zyx * 10, first[0].vertices_zyx)
  # Objects below dust_voxels get no skeleton (each tube has 900 voxels).
  assert skeletons.skeletonize(labels, skeletons.SkeletonParams(dust_voxels=901)) == []


def test_a_damaged_cache_entry_is_recomputed(tmp_path):
  labels = _tubes()
  params = skeletons.SkeletonParams(dust_voxels=100)
  skeletons.load_or_skeletonize(labels, params, tmp_path)
  (entry,) = tmp_path.iterdir()
  entry.write_bytes(b"not an npz")
  again, hit = skeletons.load_or_skeletonize(labels, params, tmp_path)
  assert not hit and len(again) == 2
  assert skeletons.load_or_skeletonize(labels, params, tmp_path)[1]


def _run_cli(*args, cache):
  env = dict(os.environ, PYTHONPATH=str(REPO), FFN_JAX_CACHE=str(cache))
  env.pop("FFN_JAX_TRACEBACK", None)
  return subprocess.run([sys.executable, "-m", "ffn_jax.evaluate", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_reports_skeleton_scores_of_two_tubes(tmp_path):
  truth = _tubes()
  volumes.write_zarr(str(tmp_path / "truth.zarr"), truth)
  merged = np.where(truth > 0, 5, 0).astype(np.uint32)
  cut = truth * 3
  cut[20:][truth[20:] == 1] = 4  # tube 1 cut in two at z = 20
  segs = {"perfect": truth * 7 + 1, "merged": merged, "cut": cut}
  for name, seg in segs.items():
    volumes.write_zarr(str(tmp_path / f"{name}.zarr"), seg)
  cache = tmp_path / "cache"
  out = {}
  for name in segs:
    proc = _run_cli("--segmentation", tmp_path / f"{name}.zarr", "--truth",
                    tmp_path / "truth.zarr", "--voxel-size-zyx", "10,10,10",
                    "--skeleton-dust-voxels", "100", cache=cache)
    assert proc.returncode == 0, proc.stderr
    out[name] = json.loads(proc.stdout)
  assert [out[n]["skeleton_cache"] for n in segs] == ["miss", "hit", "hit"]
  assert len(list((cache / "skeletons").iterdir())) == 1
  perfect = out["perfect"]
  for key in ("vi", "are", "erl", "erl_voxels", "erl_max", "skeleton_length", "merges", "splits",
              "omitted"):
    assert key in perfect, key
  # Each tube's skeleton runs from z 2 to z 37: 35 to 35 x sqrt(3) voxels of 10 nm.
  length = perfect["skeleton_length"]
  assert 2 * 350 <= length <= 2 * 350 * 3 ** 0.5
  assert perfect["erl"] == pytest.approx(perfect["erl_max"]) == pytest.approx(length / 2)
  assert perfect["erl_voxels"] == pytest.approx(perfect["erl"] / 10)
  assert (perfect["merges"], perfect["splits"], perfect["omitted"]) == (0, 0, 0.0)
  assert (out["merged"]["erl"], out["merged"]["merges"], out["merged"]["splits"]) == (0.0, 1, 0)
  assert out["merged"]["vi"] > 0 and out["merged"]["erl_max"] == pytest.approx(length / 2)
  # The cut: two runs of about (tube - 1 voxel) / 2 each on tube 1, tube 2 whole.
  tube = length / 2
  half = (tube - 10) / 2
  assert (out["cut"]["merges"], out["cut"]["splits"]) == (0, 1)
  assert out["cut"]["erl"] == pytest.approx((2 * half ** 2 + tube ** 2) / length, rel=0.05)
  # --no-skeletons: VI and ARE only, as before.
  proc = _run_cli("--segmentation", tmp_path / "cut.zarr", "--truth", tmp_path / "truth.zarr",
                  "--no-skeletons", cache=cache)
  assert proc.returncode == 0 and "erl" not in json.loads(proc.stdout)
  assert json.loads(proc.stdout)["vi"] == pytest.approx(out["cut"]["vi"])


@pytest.mark.parametrize("extra, text", [
    (("--voxel-size-zyx", "10,0,10"), "positive numbers"),
    (("--voxel-size-zyx", "10,10"), "positive numbers"),
    (("--skeleton-min-nodes", "0"), "integer >= 1"),
])
def test_cli_bad_skeleton_options_are_one_line_errors(tmp_path, extra, text):
  volumes.write_zarr(str(tmp_path / "truth.zarr"), _tubes()[:8])
  proc = _run_cli("--segmentation", tmp_path / "truth.zarr", "--truth", tmp_path / "truth.zarr",
                  *extra, cache=tmp_path / "cache")
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], proc.stderr
