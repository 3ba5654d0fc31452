"""Whole-volume inference: the tile plan, stitching into global IDs, and the tiled infer.py run
(one rank, two ranks, resume, precomputed output, bad sizes)."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import REPO, cli_env, load_bench, write_infer_assets
from ffn_jax import evaluation
from ffn_jax.data import volumes
from ffn_jax.errors import UserError
from ffn_jax.inference import tiled, tiling


@pytest.mark.parametrize("start,size,tile,overlap", [
    ((0, 0, 0), (28, 28, 28), (16, 16, 16), (4, 4, 4)),
    ((3, 5, 7), (40, 17, 9), (16, 16, 16), (6, 2, 0)),
    ((0, 0, 0), (10, 64, 33), (12, 20, 20), (5, 9, 3)),
])
def test_tile_cores_cover_every_voxel_exactly_once(start, size, tile, overlap):
  tiles = tiling.plan(start, size, tile, overlap)
  hits = np.zeros(size, np.int32)
  for t in tiles:
    lo = np.subtract(t.core_start, start)
    hits[tuple(slice(a, a + n) for a, n in zip(lo, t.core_size))] += 1
    assert all(s >= b and s + n <= b + m for s, n, b, m in zip(t.start, t.size, start, size))
    assert all(cs >= s and cs + cn <= s + n for cs, cn, s, n in
               zip(t.core_start, t.core_size, t.start, t.size))
    assert all(n <= max(tt, 1) for n, tt in zip(t.size, tile))
  assert (hits == 1).all()
  # Neighbours overlap by at least the requested amount.
  for a in tiles:
    for b in tiles:
      d = np.subtract(b.index, a.index)
      if d.tolist() in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        axis = int(np.argmax(d))
        assert a.stop[axis] - b.start[axis] >= overlap[axis]


@pytest.mark.parametrize("tile,overlap,text", [
    ((16, 16, 0), (4, 4, 4), "positive"),
    ((16, 16, 16), (8, 4, 4), "below half"),
    ((16, 16), (4, 4, 4), "three values"),
    ((16, 16, 16), (-1, 4, 4), ">= 0"),
])
def test_bad_tile_sizes_are_user_errors(tile, overlap, text):
  with pytest.raises(UserError, match=text):
    tiling.plan((0, 0, 0), (30, 30, 30), tile, overlap)


def _truth():
  """Two neurons touching along a plane plus a long one crossing every tile border."""
  truth = np.zeros((24, 24, 24), np.uint32)
  truth[:, :12, :] = 1
  truth[:, 12:, :] = 2
  truth[10:14, 10:14, :] = 3  # a thin process across all x tiles
  return truth


def _write_tiles(tmp_path, truth, tiles, split=None):
  """Each tile's 'segmentation': the truth in its box with its own random local IDs; ``split``
  (tile index) cuts object 1 in that tile into two pieces (which the neighbours see whole)."""
  rng = np.random.default_rng(0)
  for k, t in enumerate(tiles):
    box = truth[tuple(slice(a, a + n) for a, n in zip(t.start, t.size))].astype(np.int64)
    if k == split:
      box[(box == 1) & (np.arange(box.shape[2]) >= box.shape[2] // 2)] = 4
    perm = np.concatenate([[0], rng.permutation(np.arange(1, 6)) + 10 * k])
    folder = tmp_path / "tiles" / t.name
    folder.mkdir(parents=True)
    volumes.write_zarr(str(folder / "segmentation.zarr"), perm[box].astype(np.uint32))


def _stitch(tmp_path, tiles, fmt="zarr", output="", box=(24, 24, 24), **settings):
  settings = {"min_overlap_voxels": 10, "min_fraction": 0.6, "margin": 0, "join_fraction": 0.9,
              **settings}
  config = ml_collections.ConfigDict({"stitch": {"output": output}})
  identity = {"voxel_size_zyx": [1.0, 1.0, 1.0], "job": "test"}
  return tiled.stitch(str(tmp_path), tiles, identity, settings, config, fmt, ((0, 0, 0), box))


def test_stitching_joins_objects_across_borders_and_keeps_touching_ones_apart(tmp_path):
  truth = _truth()
  tiles = tiling.plan((0, 0, 0), truth.shape, (14, 14, 14), (4, 4, 4))
  _write_tiles(tmp_path, truth, tiles)
  summary = _stitch(tmp_path, tiles)
  seg = volumes.open_volume(str(tmp_path / "segmentation.zarr"))
  assert seg.offset_zyx() == (0, 0, 0)
  m = evaluation.evaluate_segmentation(seg.read(), truth)
  assert m["vi"] == pytest.approx(0.0, abs=1e-9) and summary["segments"] == 3
  sizes = json.loads((tmp_path / "segments.json").read_text())
  assert sorted(sizes.values()) == sorted(np.bincount(truth.ravel())[1:].tolist())


def test_a_split_in_one_tile_is_not_glued_through_a_neighbour(tmp_path):
  """Tile 0 splits object 1 into two pieces that both reach its overlaps; each neighbour that
  holds object 1 whole shares only half of it with either piece, below min_fraction, so neither
  piece joins through it: the split stays a split (never a merge of two objects), and the piece
  that alone reaches the x neighbour still joins the rest of object 1 there."""
  truth = _truth()
  tiles = tiling.plan((0, 0, 0), truth.shape, (14, 14, 14), (4, 4, 4))
  _write_tiles(tmp_path, truth, tiles, split=0)
  summary = _stitch(tmp_path, tiles)
  seg = volumes.open_volume(str(tmp_path / "segmentation.zarr")).read()
  m = evaluation.evaluate_segmentation(seg, truth)
  assert m["vi_merge"] == pytest.approx(0.0, abs=1e-9) and m["vi_split"] > 0
  assert summary["segments"] == 4
  # The lone piece is object 1 in tile 0's core (z, y, x < 12) at x < 7.
  piece = np.unique(seg[:12, :12, :7][truth[:12, :12, :7] == 1])
  assert len(piece) == 1 and (seg == piece[0]).sum() == (truth[:12, :12, :7] == 1).sum()


def test_match_region_drops_a_margin_at_inner_tile_edges_only():
  tiles = tiling.plan((0, 0, 0), (10, 10, 28), (10, 10, 18), (4, 4, 8))
  assert [t.start[2] for t in tiles] == [0, 10]
  assert tiling.match_region(*tiles, (0, 0, 0), (10, 10, 28)) == ((0, 0, 10), (10, 10, 8))
  # z and y edges lie on the box's boundary and stay; x loses 3 at tile 0's end and tile 1's start.
  assert tiling.match_region(*tiles, (0, 0, 0), (10, 10, 28), 3) == ((0, 0, 13), (10, 10, 2))
  assert tiling.match_region(*tiles, (0, 0, 0), (10, 10, 28), 4) is None


def _sliver_tiles(tmp_path):
  """One object crossing an x border; each tile cuts off a 3-voxel sliver next to its own inner
  edge (as an FFN does where its FOV cannot reach). Writes the tiles and tiling.json."""
  truth = np.ones((10, 10, 28), np.uint32)
  tiles = tiling.plan((0, 0, 0), truth.shape, (10, 10, 18), (4, 4, 8))
  left = np.ones((10, 10, 18), np.uint32)
  left[..., 15:] = 2
  right = np.full((10, 10, 18), 5, np.uint32)
  right[..., :3] = 6
  for t, seg in zip(tiles, (left, right)):
    (tmp_path / "tiles" / t.name).mkdir(parents=True)
    volumes.write_zarr(str(tmp_path / "tiles" / t.name / "segmentation.zarr"), seg)
  (tmp_path / "tiling.json").write_text(json.dumps({
      "identity": {"bbox_start_zyx": [0, 0, 0], "bbox_size_zyx": list(truth.shape)},
      "tiles": [t.to_json() for t in tiles]}))
  return truth, tiles


def test_margin_matches_tiles_that_disagree_only_next_to_their_edges(tmp_path):
  """Over the whole overlap the two tiles' segments share too little; in the middle of the
  overlap they agree."""
  truth, tiles = _sliver_tiles(tmp_path)
  results = {}
  for margin in (0, 3):
    _stitch(tmp_path, tiles, output=f"m{margin}.zarr", box=truth.shape, margin=margin)
    seg = volumes.open_volume(str(tmp_path / f"m{margin}.zarr")).read()
    results[margin] = evaluation.evaluate_segmentation(seg, truth)
  assert results[0]["vi_split"] > 0.5
  assert results[3]["vi"] == pytest.approx(0.0, abs=1e-9)


def test_stitch_study_restitches_the_kept_tiles_with_each_rule(tmp_path):
  truth, _ = _sliver_tiles(tmp_path)
  volumes.write_zarr(str(tmp_path / "single.zarr"), truth)
  proc = subprocess.run([sys.executable, "bench/stitch_study.py", "--tiled", str(tmp_path),
                         "--reference", str(tmp_path / "single.zarr"), "--truth",
                         str(tmp_path / "single.zarr"), "--rules", "10,0.6,0", "10,0.6,3"],
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
  assert [r["rule"] for r in rows] == ["reference", "10,0.6,0", "10,0.6,3"]
  no_margin, margin = rows[1], rows[2]
  # Each sliver joins the other tile's piece, but the two pieces never join each other.
  assert no_margin["merges"] == 2 and no_margin["reference_objects_split"] == 1
  # The two halves' segments share 200 voxels in the overlap: the thresholds declined them.
  assert [no_margin[f"split_{k}"] for k in ("rule", "within_tile", "unlabelled",
                                            "no_shared_voxels")] == [1, 0, 0, 0]
  assert no_margin["vi_vs_reference"] == pytest.approx(1.0, abs=0.01)  # two halves: 1 bit
  assert margin["merges"] == 1 and margin["reference_objects_split"] == 0
  assert margin["vi_vs_reference"] == pytest.approx(0.0, abs=1e-9) == margin["vi"]
  assert margin["objects_merging_reference"] == 0
  # The truth here is the reference: the object it keeps whole is split without the margin.
  assert no_margin["neurons_split"] == 1 and margin["neurons_split"] == 0


@pytest.mark.parametrize("case,reason", [("split", "within_tile"), ("hole", "unlabelled"),
                                         ("shifted", "no_shared_voxels")])
def test_stitch_study_says_why_each_reference_object_is_split(tmp_path, case, reason):
  truth = _truth()
  tiles = tiling.plan((0, 0, 0), truth.shape, (14, 14, 14), (4, 4, 4))
  _write_tiles(tmp_path, truth, tiles, split=0 if case == "split" else None)
  # Tile z0_y1_x0's core holds a quarter of object 2 (y >= 12, z and x < 12).
  k = [t.name for t in tiles].index("z0_y1_x0")
  path = str(tmp_path / "tiles" / tiles[k].name / "segmentation.zarr")
  seg = volumes.open_volume(path).read()
  obj = seg[0, -1, 0]  # object 2's local ID in that tile
  if case == "hole":
    seg[seg == obj] = 0
  elif case == "shifted":  # the tile labels object 2 only where no neighbour's box reaches
    alone = np.zeros(seg.shape, bool)
    alone[:10, 4:, :10] = True
    seg[(seg == obj) & ~alone] = 0
  if case != "split":
    volumes.write_zarr(path, seg)
  (tmp_path / "tiling.json").write_text(json.dumps({
      "identity": {"bbox_start_zyx": [0, 0, 0], "bbox_size_zyx": list(truth.shape)},
      "tiles": [t.to_json() for t in tiles]}))
  study = load_bench("stitch_study")
  _, start, size, read = study.load_tiles(str(tmp_path))
  out, tables, _ = study.stitched(tiles, start, size, read, 10, 0.6, 0)
  assert evaluation.split_objects(truth, out) == 1
  reasons = study.explain_splits(tiles, start, size, read, tables, truth, margin=0)
  assert reasons == {**dict.fromkeys(study.SPLIT_REASONS, 0), reason: 1}


def test_strict_thresholds_leave_the_tiles_apart_and_restitching_needs_a_new_name(tmp_path):
  truth = _truth()
  tiles = tiling.plan((0, 0, 0), truth.shape, (14, 14, 14), (4, 4, 4))
  _write_tiles(tmp_path, truth, tiles)
  _stitch(tmp_path, tiles)
  with pytest.raises(UserError, match="stitch.output"):
    _stitch(tmp_path, tiles, min_overlap_voxels=10**6)
  summary = _stitch(tmp_path, tiles, output="strict.zarr", min_overlap_voxels=10**6)
  assert summary["merges"] == 0 and summary["segments"] > 3
  assert (tmp_path / "strict.zarr.segments.json").exists()


def test_precomputed_output_opens_at_its_offset(tmp_path):
  import tensorstore as ts
  truth = _truth()
  tiles = tiling.plan((0, 0, 0), truth.shape, (14, 14, 14), (4, 4, 4))
  _write_tiles(tmp_path, truth, tiles)
  config = ml_collections.ConfigDict({"stitch": {"output": ""}})
  identity = {"voxel_size_zyx": [10.0, 8.0, 8.0]}
  # The same tiles placed at offset (5, 6, 7) of a larger volume.
  shifted = [tiling.Tile(t.index, *[tuple(a + o for a, o in zip(v, (5, 6, 7))) if i % 2 == 0
                                    else v for i, v in enumerate(
                                        (t.start, t.size, t.core_start, t.core_size))])
             for t in tiles]
  settings = {"min_overlap_voxels": 10, "min_fraction": 0.6, "margin": 0, "join_fraction": 0.9}
  tiled.stitch(str(tmp_path), shifted, identity, settings, config, "precomputed",
               ((5, 6, 7), (24, 24, 24)))
  store = ts.open({"driver": "neuroglancer_precomputed",
                   "kvstore": {"driver": "file", "path": str(tmp_path / "segmentation")}}).result()
  assert list(store.domain.inclusive_min[:3]) == [7, 6, 5]  # x, y, z
  info = json.loads((tmp_path / "segmentation" / "info").read_text())
  assert info["type"] == "segmentation" and info["scales"][0]["resolution"] == [8.0, 8.0, 10.0]
  xyz = store[..., 0].read().result()
  assert evaluation.evaluate_segmentation(xyz.transpose(2, 1, 0), truth)["vi"] == pytest.approx(
      0.0, abs=1e-9)
  vol = volumes.open_volume(str(tmp_path / "segmentation"))
  assert vol.shape == (24, 24, 24) and vol.offset_zyx() == (5, 6, 7)


# --------------------------------------------------------------------------- continuation
def test_rounds_put_face_neighbours_apart_and_priors_come_from_their_cores():
  tiles = tiling.plan((0, 0, 0), (30, 30, 30), (14, 14, 14), (4, 4, 4))
  first, second = tiling.rounds(tiles)
  assert sorted(first + second) == list(range(len(tiles)))
  for i in first:
    for j in first + second:
      face = sum(abs(a - b) for a, b in zip(tiles[i].index, tiles[j].index)) == 1
      assert not (face and j in first)
  labels = {i: np.full(tiles[i].size, 7 + i, np.uint32) for i in first}
  read = lambda i, start, size: labels[i][tuple(  # noqa: E731
      slice(a - b, a - b + n) for a, b, n in zip(start, tiles[i].start, size))]
  def core_in_box(i, k):
    region = tiling.intersection(tiles[i].core(), tiles[k])
    return 0 if region is None else int(np.prod(region[1]))

  k = second[0]  # tile (0, 0, 1)
  prior, links = tiling.priors(tiles, k, first, read)
  # Its face neighbours give priors, and so do first-round tiles whose cores reach its box at an
  # edge or a corner.
  assert {(0, 0, 0), (0, 0, 2), (0, 1, 1), (1, 0, 1)} <= {tiles[i].index for i, _ in links}
  assert sorted(i for i, _ in links) == [i for i in first if core_in_box(i, k)]
  for label, (i, a) in enumerate(links, start=1):
    assert a == 7 + i
    where = np.argwhere(prior == label) + tiles[k].start  # volume coordinates
    core_lo, core_hi = np.array(tiles[i].core_start), np.add(tiles[i].core_start,
                                                             tiles[i].core_size)
    assert len(where) and np.all((where >= core_lo) & (where < core_hi))
  # Outside the first-round cores the tile starts empty.
  assert (prior == 0).sum() == sum(core_in_box(j, k) for j in second)


def _tiles_with_oracle(labels, tiles, mode, min_overlap_voxels):
  """Segments each tile with the exact oracle FFN (as tiled.run does, in memory) and stitches."""
  from test_inference import DELTAS, FOV, canvas_joins, exact_predict

  from ffn_jax.inference import canvas as canvas_lib
  from ffn_jax.inference import options as options_lib
  from ffn_jax.inference import seed
  segs, links = {}, []

  def read(k, start, size):
    return segs[k][tuple(slice(a - b, a - b + n) for a, b, n in zip(start, tiles[k].start, size))]

  rounds = tiling.rounds(tiles) if mode == "continue" else [list(range(len(tiles)))]
  for r, members in enumerate(rounds):
    for k in members:
      box = tuple(slice(a, a + n) for a, n in zip(tiles[k].start, tiles[k].size))
      prior = None
      if r > 0:
        prior, back = tiling.priors(tiles, k, rounds[0], read)
        links += [(k, b, i, a) for b, (i, a) in enumerate(back, start=1)]
      c = canvas_lib.Canvas((labels[box] * 10).astype(np.float32), exact_predict, 1, FOV, DELTAS,
                            options_lib.InferenceOptions(min_segment_size=50), prior=prior)
      c.set_seeds(seed.policy_grid(labels[box].shape, step=6, offsets=(4, 7)))
      c.segment_all()
      segs[k] = c.segmentation
      if prior is not None:
        links += [(k, sid, k, prior_id) for sid, prior_id in canvas_joins(c)]
  result = tiling.stitch_tables(tiles, read, (0, 0, 0), labels.shape, min_overlap_voxels, 0.6,
                                0, links)
  out = np.zeros(labels.shape, np.int64)
  for core_start, core in tiling.cores(tiles, result.tables, read):
    out[tuple(slice(a, a + n) for a, n in zip(core_start, core.shape))] = core
  return out, links


def test_continued_tiles_keep_objects_whole_across_a_face_without_the_rule():
  """Two tiles along x and an oracle FFN: continuation alone (the rule switched off) carries
  every object across the face with one ID, as close to the truth as one pass over the whole
  box; independent tiles without the rule cut every crossing object in two."""
  from test_inference import DELTAS, FOV, exact_predict, voronoi_labels

  from ffn_jax.inference import canvas as canvas_lib
  from ffn_jax.inference import options as options_lib
  from ffn_jax.inference import seed
  labels = voronoi_labels(n=9, rng_seed=3)
  tiles = tiling.plan((0, 0, 0), labels.shape, (34, 34, 22), (10, 10, 10))
  single = canvas_lib.Canvas((labels * 10).astype(np.float32), exact_predict, 1, FOV, DELTAS,
                             options_lib.InferenceOptions(min_segment_size=50))
  single.set_seeds(seed.policy_grid(labels.shape, step=6, offsets=(4, 7)))
  single.segment_all()
  split = lambda seg: evaluation.evaluate_segmentation(seg, labels)["vi_split"]  # noqa: E731
  continued, links = _tiles_with_oracle(labels, tiles, "continue", 10**9)
  independent, _ = _tiles_with_oracle(labels, tiles, "independent", 10**9)
  assert len(links) >= 4
  assert split(continued) <= split(single.segmentation) + 0.05
  assert split(independent) > split(single.segmentation) + 0.3
  # With the rule on as well, it finds nothing the continuation had not already joined.
  ruled, _ = _tiles_with_oracle(labels, tiles, "continue", 10)
  assert evaluation.evaluate_segmentation(ruled, continued)["vi"] == pytest.approx(0, abs=1e-9)


# --------------------------------------------------------------------------- infer.py, tiled
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiled_assets")
  write_infer_assets(root, 30)
  return root


def _infer(assets, workdir, *extra, ranks=None):
  cmd = [sys.executable, "infer.py", "--config", "configs/fib25_infer.py", "--workdir",
         str(workdir), f"--config.checkpoint={assets / 'ckpt'}",
         f"--config.image={assets / 'image.zarr'}", "--config.image_mean=-1",
         "--config.image_stddev=-1", "--config.inference.min_segment_size=20",
         "--config.progress_interval_s=-1", "--config.bbox_start_zyx=(1,2,3)",
         "--config.bbox_size_zyx=(28,27,26)", *extra]
  if ranks:
    from conftest import mpirun
    cmd = [mpirun(), "-n", str(ranks), *cmd]
  return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=600)


TILES = ("--config.tile_size_zyx=(22,22,22)", "--config.tile_overlap_zyx=(10,10,10)",
         "--config.tile_mode=continue")


@pytest.fixture(scope="module")
def plain_tiles(assets, tmp_path_factory):
  """The tiled run with every tiling default (independent tiles; tile_seeds=auto, here job),
  run once for the tests that read it. Read it; a test may try a refused command on it."""
  workdir = tmp_path_factory.mktemp("plain_tiles") / "w"
  proc = _infer(assets, workdir, *TILES[:2])
  assert proc.returncode == 0, proc.stderr
  return workdir


def test_a_tiled_run_opens_the_checkpoint_and_builds_the_predictor_once_per_rank(plain_tiles):
  """Each rank opens the job once (checkpoint, image, predictor): every tile's counters and the
  stitch summary say so, and only the first tile pays for loading the model."""
  summary = json.loads((plain_tiles / "stitch.json").read_text())
  assert summary["checkpoint_loads"] == [1] and summary["predictor_builds"] == [1]
  tiles = [json.loads(p.read_text())
           for p in sorted((plain_tiles / "tiles").glob("*/counters.json"))]
  assert len(tiles) == summary["tiles"] == 8
  assert all(t["checkpoint_loads"] == 1 and t["predictor_builds"] == 1 for t in tiles)
  assert sum("time_model_load_s" in t for t in tiles) == 1


@pytest.mark.slow
def test_tiled_run_one_and_two_ranks_and_resume(assets, tmp_path, plain_tiles):
  one = _infer(assets, tmp_path / "one", *TILES)
  assert one.returncode == 0, one.stderr
  seg_one = volumes.open_volume(str(tmp_path / "one" / "segmentation.zarr"))
  assert seg_one.shape == (28, 27, 26) and seg_one.offset_zyx() == (1, 2, 3)
  summary = json.loads((tmp_path / "one" / "stitch.json").read_text())
  n_tiles = len(tiling.plan((1, 2, 3), (28, 27, 26), (22, 22, 22), (10, 10, 10)))
  assert summary["tiles"] == n_tiles == 8 and summary["segments"] >= 2
  assert summary["voxels_labelled"] == int((seg_one.read() > 0).sum())
  # Every tile is the single-box job of its box.
  tiling_json = json.loads((tmp_path / "one" / "tiling.json").read_text())
  assert len(tiling_json["tiles"]) == n_tiles
  # Continuation: the second-round tiles say which neighbour objects they carried on.
  first, second = tiling.rounds([tiling.Tile.from_json(t) for t in tiling_json["tiles"]])
  names = [tiling.Tile.from_json(t).name for t in tiling_json["tiles"]]
  assert not any((tmp_path / "one" / "tiles" / names[k] / "prior.json").exists() for k in first)
  links = [json.loads((tmp_path / "one" / "tiles" / names[k] / "prior.json").read_text())["links"]
           for k in second]
  assert summary["continued"] == sum(map(len, links)) > 0
  assert {name for tile_links in links for name, _ in tile_links} <= {names[k] for k in first}
  # The default mode, independent tiles, continues nothing.
  assert json.loads((plain_tiles / "stitch.json").read_text())["continued"] == 0
  assert not list((plain_tiles / "tiles").glob("*/prior.json"))

  # Two ranks, written as neuroglancer precomputed: the same segmentation, at its offset.
  two = _infer(assets, tmp_path / "two", *TILES, "--config.output_format=precomputed", ranks=2)
  assert two.returncode == 0, two.stderr
  assert not (tmp_path / "two" / "segmentation.zarr").exists()
  info = json.loads((tmp_path / "two" / "segmentation" / "info").read_text())
  assert info["type"] == "segmentation" and info["data_type"] == "uint32"
  scale = info["scales"][0]
  assert scale["voxel_offset"] == [3, 2, 1] and scale["size"] == [26, 27, 28]  # xyz
  assert scale["resolution"] == [1.0, 1.0, 1.0]  # voxel_size_zyx, as xyz
  seg_two = volumes.open_volume(str(tmp_path / "two" / "segmentation"))
  assert seg_two.offset_zyx() == (1, 2, 3)
  np.testing.assert_array_equal(seg_two.read(), seg_one.read())
  two_summary = json.loads((tmp_path / "two" / "stitch.json").read_text())
  counts = two_summary["tiles_segmented"]
  assert sum(counts) == n_tiles and len(counts) == 2 and min(counts) > 0
  assert two_summary["checkpoint_loads"] == two_summary["predictor_builds"] == [1, 1]

  # Killed after the first tiles: the rerun finishes the rest, to the same output.
  killed = _infer(assets, tmp_path / "resumed", *TILES, "--config.debug.stop_after_fov_calls=0")
  assert not (tmp_path / "resumed" / "segmentation.zarr").exists(), killed.stdout
  again = _infer(assets, tmp_path / "resumed", *TILES)
  assert again.returncode == 0, again.stderr
  np.testing.assert_array_equal(
      volumes.open_volume(str(tmp_path / "resumed" / "segmentation.zarr")).read(), seg_one.read())
  # And the same command once more: nothing to do, nothing overwritten.
  mtime = os.path.getmtime(tmp_path / "one" / "segmentation.zarr" / ".zarray")
  rerun = _infer(assets, tmp_path / "one", *TILES)
  assert rerun.returncode == 0 and "nothing to do" in rerun.stdout, rerun.stderr
  assert os.path.getmtime(tmp_path / "one" / "segmentation.zarr" / ".zarray") == mtime


@pytest.mark.parametrize("extra,text", [
    (("--config.tile_size_zyx=(16,16,16)", "--config.tile_overlap_zyx=(8,6,6)"), "below half"),
    (("--config.tile_size_zyx=(16,0,16)",), "positive"),
    (TILES + ("--config.stitch.min_fraction=0.4",), "min_fraction"),
    (TILES + ("--config.stitch.margin=5",), "stitch.margin"),
    (TILES + ("--config.output_format=n5",), "output_format"),
    (TILES[:2] + ("--config.tile_mode=sequential",), "tile_mode"),
    (("--config.tile_size_zyx=(22,22,22)", "--config.tile_overlap_zyx=(10,9,10)",
      "--config.tile_mode=continue"), "above the FOV"),
    (TILES + ("--config.stitch.join_fraction=0.5",), "join_fraction"),
    (TILES + ("--config.tile_seeds=global",), "tile_seeds"),
    (TILES + ("--config.tile_seeds=halo", "--config.seed_halo=-1"), "seed_halo"),
])
def test_bad_tiling_settings_are_one_line_exit_2(assets, tmp_path, extra, text):
  proc = _infer(assets, tmp_path / "bad", *extra)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and text in lines[0], proc.stderr


def test_ranks_sharing_a_node_take_its_devices_in_turn():
  from ffn_jax import parallel
  gpus = ["gpu0", "gpu1", "gpu2", "gpu3"]
  assert [parallel.pick_device(gpus, r) for r in range(6)] == gpus + gpus[:2]
  assert parallel.pick_device(["cpu0"], 3) == "cpu0"  # one visible device: every rank's
  assert parallel.node_rank(parallel.Dist()) == (0, 1)


def _shell_labelled(workdir, faces):
  """Mean over tiles of the labelled share of the half-FOV shells inside the ``faces`` ("inner":
  those towards a neighbour tile; "outer": those on the bbox's faces)."""
  plan = json.loads((workdir / "tiling.json").read_text())
  starts = np.array([t["start"] for t in plan["tiles"]])
  lo_box, hi_box = starts.min(0), (starts + np.array([t["size"] for t in plan["tiles"]])).max(0)
  shares = []
  for t in plan["tiles"]:
    tile = tiling.Tile.from_json(t)
    seg = volumes.open_volume(str(workdir / "tiles" / tile.name / "segmentation.zarr")).read()
    shell = np.zeros(seg.shape, bool)
    for d in range(3):
      for side, at_box in ((0, tile.start[d] == lo_box[d]), (1, tile.stop[d] == hi_box[d])):
        if at_box == (faces == "outer"):
          index = [slice(None)] * 3
          index[d] = slice(0, 4) if side == 0 else slice(seg.shape[d] - 4, None)  # FOV 9^3
          shell[tuple(index)] = True
    shares.append((seg[shell] > 0).mean())
  return float(np.mean(shares))


@pytest.mark.slow
def test_context_lets_tiles_label_their_inner_faces(assets, tmp_path, plain_tiles):
  """tile_context=True (or border_padding=context): a tile's canvas holds its neighbours' image,
  so its FOVs reach the faces towards them (without, no FOV is centred in the half-FOV shell
  inside each face); with tile_context alone the bbox's outer faces stay as without padding."""
  runs = {"none": None, "tile_context": ("--config.tile_context=True",),
          "context": ("--config.border_padding=context",)}
  inner, outer = {}, {}
  for name, extra in runs.items():
    workdir = plain_tiles if extra is None else tmp_path / name
    if extra is not None:
      proc = _infer(assets, workdir, *TILES[:2], *extra)
      assert proc.returncode == 0, proc.stderr
    inner[name] = _shell_labelled(workdir, "inner")
    outer[name] = _shell_labelled(workdir, "outer")
    seg = volumes.open_volume(str(workdir / "segmentation.zarr"))
    assert seg.shape == (28, 27, 26) and seg.offset_zyx() == (1, 2, 3)
  assert inner["tile_context"] > inner["none"] + 0.1, inner
  assert inner["context"] > inner["none"] + 0.1, inner
  assert outer["tile_context"] == pytest.approx(outer["none"], abs=0.05), outer
  assert outer["context"] > outer["none"] + 0.1, outer
  # A workdir of tiles without context is another job's: refused, nothing overwritten.
  refused = _infer(assets, plain_tiles, *TILES[:2], "--config.tile_context=True")
  assert refused.returncode == 2 and "different" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_tiles_take_the_single_passs_seeds_with_tile_seeds_job(assets, tmp_path, plain_tiles):
  """tile_seeds=job (auto, on a bbox this small): the seed policy runs once over the bbox, as the
  single pass does, and each tile tries exactly those of its seeds that lie in its block."""
  single = _infer(assets, tmp_path / "single")
  assert single.returncode == 0, single.stderr
  n_single = json.loads((tmp_path / "single" / "counters.json").read_text())["seeds_total"]
  workdirs = {"auto": plain_tiles, "tile": tmp_path / "tile"}  # auto: the default
  proc = _infer(assets, workdirs["tile"], *TILES[:2], "--config.tile_seeds=tile")
  assert proc.returncode == 0, proc.stderr
  for choice, workdir in workdirs.items():
    plan = json.loads((workdir / "tiling.json").read_text())
    assert plan["identity"].get("tile_seeds") == ("job" if choice == "auto" else None)
    assert (workdir / "seeds.npy").exists() == (choice == "auto")
  plan = json.loads((plain_tiles / "tiling.json").read_text())
  seeds = np.load(plain_tiles / "seeds.npy")
  assert len(seeds) == n_single > 0
  for t in map(tiling.Tile.from_json, plan["tiles"]):
    inside = np.all((seeds >= t.start) & (seeds < np.add(t.start, t.size)), axis=1)
    counters = json.loads((plain_tiles / "tiles" / t.name / "counters.json").read_text())
    assert counters["seeds_total"] == inside.sum() > 0, t.name
  # The tiles of one choice are another job's for the other: refused, nothing overwritten.
  refused = _infer(assets, tmp_path / "tile", *TILES[:2], "--config.tile_seeds=job")
  assert refused.returncode == 2 and "different" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_halo_tiles_seed_themselves_as_one_keyed_pass_would(assets, tmp_path):
  """tile_seeds=halo (auto above 384^3 voxels): no seeds.npy; each tile runs the policy over its
  block and a halo, keyed to volume coordinates, and tries exactly the seeds one keyed pass
  over the bbox places in its block."""
  from ffn_jax import cli
  from ffn_jax.inference import job as job_lib
  args = [*TILES[:2], "--config.tile_seeds=halo", "--config.seed_halo=32"]
  proc = _infer(assets, tmp_path / "halo", *args)
  assert proc.returncode == 0, proc.stderr
  plan = json.loads((tmp_path / "halo" / "tiling.json").read_text())
  assert plan["identity"]["tile_seeds"] == "halo" and plan["identity"]["seed_halo"] == 32
  assert not (tmp_path / "halo" / "seeds.npy").exists()
  config, _ = cli.parse(["infer.py", "--config", str(REPO / "configs/fib25_infer.py"),
                         "--workdir", "unused", f"--config.image={assets / 'image.zarr'}",
                         f"--config.checkpoint={assets / 'ckpt'}", "--config.image_mean=-1",
                         "--config.image_stddev=-1", "--config.bbox_start_zyx=(1,2,3)",
                         "--config.bbox_size_zyx=(28,27,26)", *args],
                        str(REPO / "configs/fib25_infer.py"), "infer")
  job = job_lib.InferenceJob.open(config)
  bbox = job.bbox()
  keyed = job.seeds(bbox, keyed=True)
  for t in map(tiling.Tile.from_json, plan["tiles"]):
    inside = np.all((keyed >= t.start) & (keyed < np.add(t.start, t.size)), axis=1)
    counters = json.loads((tmp_path / "halo" / "tiles" / t.name / "counters.json").read_text())
    assert counters["seeds_total"] == inside.sum() > 0, t.name
  # Another halo is another job: refused.
  refused = _infer(assets, tmp_path / "halo", *TILES[:2], "--config.tile_seeds=halo",
                   "--config.seed_halo=16")
  assert refused.returncode == 2 and "different" in refused.stderr, refused.stderr


def test_auto_seeds_take_the_job_up_to_384_cubed_and_a_halo_above():
  config = ml_collections.ConfigDict({"tile_seeds": "auto", "seed_halo": 48})
  assert tiled._seed_source(config, ((0, 0, 0), (384, 384, 384))) == "job"
  assert tiled._seed_source(config, ((0, 0, 0), (385, 384, 384))) == "halo"
  config.tile_seeds = "tile"
  assert tiled._seed_source(config, ((0, 0, 0), (999, 999, 999))) == "tile"
