"""infer.py end to end on a tiny zarr volume with a tiny depth-2 FFN checkpoint.

The model's last bias is set so that one prediction turns the whole FOV into "object" at
p ~ 0.64 (above the segment threshold, below the move threshold): every accepted seed becomes a
segment of one FOV, deterministically, which keeps these runs to seconds.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_infer_assets
from ffn_jax import evaluation
from ffn_jax.data import volumes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fib25_infer.py")


class _Infer:
  """infer.py's ``main`` run in this process (ml_collections reads overrides from sys.argv)."""

  def __init__(self, monkeypatch):
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(REPO, "infer.py"))
    self._mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(self._mod)
    self._monkeypatch = monkeypatch

  def main(self, argv):
    self._monkeypatch.setattr(sys, "argv", list(argv))
    return self._mod.main(list(argv))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("infer_assets")
  image_path, ckpt = write_infer_assets(root, 28)
  return {"image": image_path, "ckpt": ckpt, "root": str(root)}


def _argv(assets, workdir, *extra):
  """infer.py argv; ``extra`` "key=value" items replace the defaults (a repeated tuple override
  would be concatenated by ml_collections)."""
  overrides = {"checkpoint": assets["ckpt"], "image": assets["image"],
               "bbox_start_zyx": "(2,2,2)", "bbox_size_zyx": "(24,24,24)",
               "image_mean": "-1", "image_stddev": "-1", "inference.min_segment_size": "100",
               "progress_interval_s": "-1"}
  overrides.update(item.split("=", 1) for item in extra)
  return ["infer.py", "--config", CONFIG, "--workdir", str(workdir),
          *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _seg(workdir):
  return volumes.open_volume(os.path.join(workdir, "segmentation.zarr")).read()


def test_cli_end_to_end(assets, tmp_path):
  work = tmp_path / "out"
  argv = _argv(assets, work)
  env = {**os.environ, "PYTHONPATH": REPO}
  r = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  seg = _seg(work)
  assert seg.shape == (24, 24, 24) and seg.dtype == np.uint32
  with open(work / "counters.json") as f:
    counters = json.load(f)
  for key in ("fov_calls", "wall_s", "segments", "voxels_labelled", "time_predict_s",
              "time_seed_policy_s", "time_compile_s", "time_write_s", "time_host_s"):
    assert key in counters, key
  assert counters["segments"] == len(np.unique(seg[seg > 0])) >= 2
  assert counters["voxels_labelled"] == int((seg > 0).sum())
  assert counters["fov_calls"] >= counters["segments"]
  assert os.path.getsize(work / "preview.png") > 1000
  assert not os.path.exists(work / "inference_state.npz")
  with open(work / "segments.json") as f:
    segments = json.load(f)
  assert all(2 + 4 <= v for s in segments.values() for v in s["seed_zyx"])  # global coordinates
  # It records where it sits, so evaluate needs no --bbox-* (the README's infer -> evaluate).
  attrs = volumes.open_volume(str(work / "segmentation.zarr")).attrs
  assert attrs["offset_zyx"] == [2, 2, 2] and attrs["ffn_jax"]["job"]["checkpoint"]
  truth = np.random.default_rng(1).integers(1, 4, size=(28, 28, 28)).astype(np.uint32)
  volumes.write_zarr(str(tmp_path / "truth.zarr"), truth)
  r = subprocess.run([sys.executable, "-m", "ffn_jax.evaluate", "--segmentation",
                      str(work / "segmentation.zarr"), "--truth", str(tmp_path / "truth.zarr")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  scored = json.loads(r.stdout)
  assert scored["bbox_start_zyx"] == [2, 2, 2] and scored["bbox_size_zyx"] == [24, 24, 24]
  assert scored["vi"] == pytest.approx(evaluation.evaluate_segmentation(
      seg, truth[2:26, 2:26, 2:26])["vi"])
  # The same command again: finished job, nothing is redone or overwritten.
  mtime = os.path.getmtime(work / "segmentation.zarr" / ".zarray")
  r = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
  assert os.path.getmtime(work / "segmentation.zarr" / ".zarray") == mtime


def test_cli_resume_after_kill_equals_uninterrupted(assets, tmp_path, monkeypatch):
  infer = _Infer(monkeypatch)
  assert infer.main(_argv(assets, tmp_path / "ref")) == 0
  killed = tmp_path / "killed"
  argv = _argv(assets, killed, "checkpoint_interval_s=0")
  assert infer.main([*argv, "--config.debug.stop_after_fov_calls=2"]) == 0
  assert os.path.exists(killed / "inference_state.npz")
  assert not os.path.exists(killed / "segmentation.zarr")
  # Same job again (a different batch size does not change the result): resumes.
  assert infer.main([*argv, "--config.batch_size=3"]) == 0
  with open(killed / "counters.json") as f:
    counters = json.load(f)
  assert counters["resumed"] == 1
  assert np.array_equal(_seg(killed), _seg(tmp_path / "ref"))


def test_cli_errors(assets, tmp_path, capsys, monkeypatch):
  infer = _Infer(monkeypatch)

  def fails(argv, text):
    with pytest.raises(SystemExit) as e:
      infer.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1, err

  work = tmp_path / "w"
  fails(_argv(assets, work, "bbox_start_zyx=(10,10,10)"), "outside the volume")
  fails(_argv(assets, work, "bbox_size_zyx=(24,24,40)"), "outside the volume")
  fails(_argv(assets, work, f"image={tmp_path}/missing.zarr"), "volume not found")
  fails(_argv(assets, work, f"checkpoint={tmp_path}/nope"), "checkpoint")
  fails(_argv(assets, work, "checkpoint="), "--config.checkpoint")
  # A finished segmentation of another job is never overwritten.
  assert infer.main(_argv(assets, work)) == 0
  before = _seg(work)
  fails(_argv(assets, work, "inference.segment_threshold=0.5"), "different job")
  assert np.array_equal(_seg(work), before)


@pytest.mark.parametrize("padding", ["reflect", "context"])
def test_border_padding_reaches_the_block_border(assets, tmp_path, monkeypatch, padding):
  """border_padding=reflect|context: FOVs may be centred up to the block's border, so the outer
  half-FOV shell gets segmented; the output keeps the block's shape and global seed coords."""
  infer = _Infer(monkeypatch)
  assert infer.main(_argv(assets, tmp_path / "none")) == 0
  assert infer.main(_argv(assets, tmp_path / "reflect", f"border_padding={padding}")) == 0
  plain, padded = _seg(tmp_path / "none"), _seg(tmp_path / "reflect")
  assert padded.shape == plain.shape == (24, 24, 24)
  shell = np.ones(plain.shape, bool)
  shell[4:-4, 4:-4, 4:-4] = False  # half a FOV (9^3) from the border: no FOV centre without padding
  assert (padded[shell] > 0).mean() > (plain[shell] > 0).mean() + 0.1
  with open(tmp_path / "reflect" / "segments.json") as f:
    seeds = np.array([s["seed_zyx"] for s in json.load(f).values()])
  assert seeds.min() >= 2 and seeds.max() < 2 + 24  # inside the block, in volume coordinates
  with open(tmp_path / "reflect" / "counters.json") as f:
    assert json.load(f)["voxels_labelled"] == int((padded > 0).sum())
  with pytest.raises(SystemExit) as e:
    infer.main(_argv(assets, tmp_path / "bad", "border_padding=wrap"))
  assert e.value.code == 2


def test_context_padding_is_the_real_image_around_the_block_mirrored_past_the_volume():
  """border_padding=context pads a block with its surroundings where the volume has them
  (a tile sees its neighbours) and mirrors only beyond the volume's end, like reflect."""
  from ffn_jax.inference.padding import BorderPadding
  vol = np.random.default_rng(0).integers(0, 255, (20, 21, 22)).astype(np.uint8)
  source = volumes.open_volume(vol)
  context = BorderPadding({"border_padding": "context"}, {"fov_size_zyx": (9, 9, 9)})
  reflect = BorderPadding({"border_padding": "reflect"}, {"fov_size_zyx": (9, 9, 9)})
  inner = context.read(source, ((5, 6, 7), (8, 9, 10)))
  assert np.array_equal(inner, vol[1:17, 2:19, 3:21])
  assert np.array_equal(context.crop(inner), vol[5:13, 6:15, 7:17])
  whole = ((0, 0, 0), vol.shape)
  assert np.array_equal(context.read(source, whole), reflect.read(source, whole))
  edge = context.read(source, ((0, 2, 16), (20, 8, 6)))  # z: both volume ends; x: the far end
  want = np.pad(vol[:, 0:14, 12:22], ((4, 4), (2, 0), (0, 4)), mode="reflect")
  assert edge.shape == (28, 16, 14) and np.array_equal(edge, want)
  # A tile's inner faces take the real image in any mode; its other faces follow the mode.
  tile = BorderPadding({"border_padding": "none"}, {"fov_size_zyx": (9, 9, 9)},
                       inner_lo=(True, False, False), inner_hi=(False, False, True))
  block = tile.read(source, ((5, 6, 7), (8, 9, 10)))
  assert tile.inner and np.array_equal(block, vol[1:13, 6:15, 7:21])
  assert np.array_equal(tile.crop(block), vol[5:13, 6:15, 7:17])
  coords = np.array([[3, 6, 7], [4, 8, 9], [11, 0, 0], [11, 8, 10]])  # canvas (12, 9, 14)
  assert tile.inside(coords, block.shape).tolist() == [[4, 8, 9], [11, 0, 0]]
  mirrored = BorderPadding({"border_padding": "reflect"}, {"fov_size_zyx": (9, 9, 9)},
                           inner_lo=(True, False, False))
  want = np.pad(vol[1:13, 6:15, 7:17], ((0, 4), (4, 4), (4, 4)), mode="reflect")
  assert np.array_equal(mirrored.read(source, ((5, 6, 7), (8, 9, 10))), want)


@pytest.mark.parametrize("mode", ["none", "reflect", "context"])
def test_halo_seeds_are_the_tiles_share_of_one_keyed_pass(mode):
  """tile_seeds=halo: the seed policy over a tile's block and a halo of the job's canvas around
  it, keyed to volume coordinates, places exactly the seeds one keyed pass over the whole bbox
  places in that block, once the halo covers the policy's reach; without a halo it does not."""
  from scipy import ndimage

  from configs import fib25_infer
  from ffn_jax.inference import job as job_lib
  from ffn_jax.inference import tiling
  from ffn_jax.inference.padding import BorderPadding
  rng = np.random.default_rng(0)
  vol = ndimage.gaussian_filter(rng.normal(size=(36, 36, 128)), 2.0)
  vol = np.clip(128 + vol / vol.std() * 30, 0, 255).astype(np.uint8)
  source, model = volumes.open_volume(vol), {"fov_size_zyx": (9, 9, 9)}
  config = fib25_infer.get_config()
  config.border_padding = mode
  bbox = ((2, 3, 4), (32, 30, 120))
  # A window of the padded bbox reads what the whole padded bbox holds there.
  border = BorderPadding(config, model)
  whole_canvas = border.read(source, bbox)
  lo = np.asarray(bbox[0]) - border.lo
  for window in (((2, 3, 30), (34, 33, 90)), (tuple(lo), (34, 33, 50))):
    a, b = np.subtract(window[0], lo), np.subtract(window[1], lo)
    np.testing.assert_array_equal(border.read(source, bbox, window),
                                  whole_canvas[a[0]:b[0], a[1]:b[1], a[2]:b[2]])
  with pytest.raises(ValueError, match="window"):
    border.read(source, bbox, ((0, 0, 0), (200, 40, 40)))

  job = job_lib.InferenceJob(config, None, model, source, 128.0, 33.0, ("xla", "float32", ""))
  whole = job.seeds(bbox, keyed=True)
  tiles = tiling.plan(bbox[0], bbox[1], (32, 30, 32), (0, 0, 12))
  assert len(tiles) == 6 and len(whole) > 50
  for halo, equal in ((32, True), (0, False)):
    for t in tiles:
      got = job.seeds(bbox, block=(t.start, t.size), halo=halo)
      share = whole[np.all((whole >= t.start) & (whole < np.add(t.start, t.size)), axis=1)]
      assert np.array_equal(got, share) == equal, (halo, t.name)


def test_calibrated_flood_settings_round_trip_through_the_checkpoint_into_infer(
    assets, tmp_path, monkeypatch):
  """python -m ffn_jax.calibrate floods a labelled box once per grid setting, stores the best
  VI's settings with the checkpoint, and infer.py applies them by default; a key set on the
  command line wins, and calibration=off keeps the config's settings."""
  import shutil

  from scipy import ndimage
  ckpt = tmp_path / "ckpt"
  shutil.copytree(assets["ckpt"], ckpt)  # the module's checkpoint stays uncalibrated
  image = volumes.open_volume(assets["image"]).read()
  labels = ndimage.label(image > 128)[0].astype(np.uint32)
  volumes.write_zarr(str(tmp_path / "labels.zarr"), labels)
  common = [f"--config.image={assets['image']}", f"--config.checkpoint={ckpt}",
            "--config.bbox_start_zyx=(2,2,2)", "--config.bbox_size_zyx=(24,24,24)",
            "--config.image_mean=-1", "--config.image_stddev=-1",
            "--config.progress_interval_s=-1"]
  env = {**os.environ, "PYTHONPATH": REPO}
  cal = subprocess.run(
      [sys.executable, "-m", "ffn_jax.calibrate", "--config", CONFIG, "--workdir",
       str(tmp_path / "cal"), "--labels", str(tmp_path / "labels.zarr"), "--move-thresholds",
       "0.8", "--segment-thresholds", "0.5,0.7", "--min-size-factors", "0.1", *common],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert cal.returncode == 0, cal.stderr
  result = json.loads(cal.stdout.strip().splitlines()[-1])
  table = json.loads((tmp_path / "cal" / "calibration.json").read_text())
  assert result["tries"] == len(table["rows"]) == 3  # 2 threshold pairs, then 1 other size
  assert result["vi"] == min(r["vi"] for r in table["rows"])
  best = result["best"]
  assert best["move_threshold"] == 0.8 and best["segment_threshold"] in (0.5, 0.7)
  assert best["min_segment_size"] in (1000, 100)
  stored = json.loads((ckpt / "calibration.json").read_text())
  assert stored["latest:0"]["inference"] == best

  infer = _Infer(monkeypatch)

  def identity(name, *extra):
    argv = ["infer.py", "--config", CONFIG, "--workdir", str(tmp_path / name), *common, *extra]
    assert infer.main(argv) == 0
    return json.loads((tmp_path / name / "job.json").read_text())["identity"]["inference"]

  got = identity("auto")
  assert {k: got[k] for k in best} == best
  got = identity("explicit", "--config.inference.segment_threshold=0.6")
  assert got["segment_threshold"] == 0.6 and got["move_threshold"] == best["move_threshold"]
  got = identity("off", "--config.calibration=off")
  assert (got["move_threshold"], got["segment_threshold"], got["min_segment_size"]) == (
      0.9, 0.6, 1000)
  bad = subprocess.run(
      [sys.executable, "-m", "ffn_jax.calibrate", "--config", CONFIG, "--workdir",
       str(tmp_path / "bad"), "--labels", str(tmp_path / "labels.zarr"), "--move-thresholds",
       "1.5", *common], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "move_threshold" in bad.stderr, bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
