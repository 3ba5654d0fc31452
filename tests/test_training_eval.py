"""Segmentation validation in the training loop: eval records on schedule (one process and two
MPI ranks), the same result whichever rank floods, the best-VI checkpoint and infer.py reading it,
TensorBoard scalars, periodic schedules, and the curves plot."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cli_env, read_metrics, run_train
from ffn_jax import checkpoint
from ffn_jax.errors import UserError
from ffn_jax.training import periodic

EVAL_KEYS = {"eval", "step", "examples", "vi", "vi_split", "vi_merge", "are", "segments",
             "fraction_labelled", "fov_calls", "eval_s", "erl", "erl_voxels", "erl_max",
             "skeleton_length", "merges", "splits", "omitted"}


def _evals(workdir):
  return [r for r in read_metrics(workdir) if r.get("eval")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny run with evals at steps 10, 20 and 25 (the last), shared by the tests that only
  read a finished workdir: (workdir, completed process). Tests must not write into it."""
  workdir = tmp_path_factory.mktemp("trained")
  proc = run_train(workdir, "--config.max_steps=25", "--config.eval.every_steps=10")
  assert proc.returncode == 0, proc.stderr
  return workdir, proc


@pytest.mark.slow
def test_eval_records_on_schedule_and_best_checkpoint(trained):
  tmp_path, proc = trained
  records = read_metrics(tmp_path)
  evals = [r for r in records if r.get("eval")]
  assert [r["step"] for r in evals] == [10, 20, 25]  # every 10 steps, and at the last step
  for r in evals:
    assert EVAL_KEYS <= set(r), set(r)
    assert r["examples"] == r["step"] * 2  # tiny: global batch 2
    assert np.isfinite(r["vi"]) and r["vi"] == pytest.approx(r["vi_split"] + r["vi_merge"])
    assert 0 <= r["fraction_labelled"] <= 1 and r["fov_calls"] > 0 and r["eval_s"] > 0
    assert 0 <= r["erl"] <= r["erl_max"] and 0 <= r["omitted"] <= 1
    assert r["merges"] >= 0 and r["splits"] >= 0
  # The ceiling is that of the eval labels' own skeletons (voxel units: eval.voxel_size_zyx).
  assert evals[0]["erl_max"] == pytest.approx(_erl_max_of_the_eval_labels())
  assert len({r["erl_max"] for r in evals}) == 1
  assert "eval at step 10: VI" in proc.stdout and "ERL" in proc.stdout
  final = records[-1]
  assert final["final"] and 0 < final["eval_fraction"] < 1 and final["time_eval_s"] > 0
  # WORKDIR/best holds the parameters of the lowest VI, with its eval record.
  best_vi = min(r["vi"] for r in evals)
  best_step = max(r["step"] for r in evals if r["vi"] == best_vi)
  assert [r["step"] for r in evals if r.get("best")][-1] == best_step
  params, meta = checkpoint.load_params(str(tmp_path), kind="best")
  assert meta["eval"]["vi"] == pytest.approx(best_vi) and meta["eval"]["step"] == best_step
  assert meta["model"]["depth"] == 2 and set(params) >= {"conv0_a", "conv_lom"}


def _erl_max_of_the_eval_labels():
  """ERL of the tiny config's eval labels scored against themselves (a perfect segmentation)."""
  sys.path.insert(0, str(REPO))
  from configs import tiny
  from ffn_jax import skeleton_metrics, skeletons
  from ffn_jax.training.seg_eval import load_eval_volumes
  _, labels, _, _ = load_eval_volumes(tiny.get_config())
  skels, _ = skeletons.load_or_skeletonize(labels, skeletons.SkeletonParams())
  m = skeleton_metrics.evaluate_skeletons(labels, skels)
  assert m["erl"] == m["erl_max"] > 0 and (m["merges"], m["splits"]) == (0, 0)
  return m["erl_max"]


@pytest.mark.slow
def test_best_metric_erl_keeps_the_highest_erl_checkpoint(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=25", "--config.eval.every_steps=10",
                   "--config.eval.best_metric=erl")
  assert proc.returncode == 0, proc.stderr
  evals = _evals(tmp_path)
  assert [r["step"] for r in evals] == [10, 20, 25]
  # Strictly better replaces: the first eval with the highest ERL is kept, and "best" marks
  # each new maximum.
  best_erl = max(r["erl"] for r in evals)
  best_step = min(r["step"] for r in evals if r["erl"] == best_erl)
  running = [r["erl"] > max([-1.0] + [q["erl"] for q in evals[:i]])
             for i, r in enumerate(evals)]
  assert [r["best"] for r in evals] == running
  _, meta = checkpoint.load_params(str(tmp_path), kind="best")
  assert meta["eval"]["step"] == best_step and meta["eval"]["erl"] == pytest.approx(best_erl)


def test_best_params_by_erl_keeps_the_highest_and_reads_it_back(tmp_path):
  params = {"w": np.zeros(2, np.float32)}
  best = checkpoint.BestParams(str(tmp_path / "best"), "erl")
  offers = [(1, 2.0), (2, 5.0), (3, 4.0), (4, None), (5, 5.0)]
  assert [best.offer(s, params, {"erl": e, "vi": 1.0 / s}, {}) for s, e in offers] == [
      True, True, False, False, False]
  best.manager.close()
  again = checkpoint.BestParams(str(tmp_path / "best"), "erl")
  assert again.score == 5.0
  assert not again.offer(6, params, {"erl": 4.9}, {}) and again.offer(7, params, {"erl": 6}, {})
  again.manager.close()
  _, meta = checkpoint.load_params(str(tmp_path / "best"))
  assert meta["eval"] == {"erl": 6}
  # By VI the same directory's record reads back as its VI to beat (lower is better).
  by_vi = checkpoint.BestParams(str(tmp_path / "best"), "vi")
  assert by_vi.score is None  # the last record has no "vi"
  assert by_vi.offer(8, params, {"vi": 2.0}, {}) and not by_vi.offer(9, params, {"vi": 2.5}, {})
  by_vi.manager.close()
  with pytest.raises(UserError, match="best metric"):
    checkpoint.BestParams(str(tmp_path / "other"), "are")


def _infer(workdir, out, *extra):
  argv = [sys.executable, "infer.py", "--config", "configs/synthetic_infer.py", "--workdir",
          str(out), f"--config.checkpoint={workdir}", "--config.synthetic.shape_zyx=(24,40,40)",
          "--config.progress_interval_s=-1", *extra]
  return subprocess.run(argv, cwd=REPO, env=cli_env(), capture_output=True, text=True,
                        timeout=300)


@pytest.mark.slow
def test_infer_reads_the_best_checkpoint_of_a_workdir(trained, tmp_path):
  proc = _infer(trained[0], tmp_path / "seg", "--config.checkpoint_kind=best")
  assert proc.returncode == 0, proc.stderr
  job = json.loads((tmp_path / "seg" / "job.json").read_text())
  assert job["identity"]["checkpoint_kind"] == "best"
  # A workdir without an eval has no best checkpoint (here: a copy, its WORKDIR/best removed):
  # one line, exit 2.
  shutil.copytree(trained[0], tmp_path / "plain")
  shutil.rmtree(tmp_path / "plain" / checkpoint.BEST_DIR)
  proc = _infer(tmp_path / "plain", tmp_path / "seg2", "--config.checkpoint_kind=best")
  assert proc.returncode == 2 and "no best checkpoint" in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_eval_at_start_scores_the_initial_parameters(tmp_path):
  proc = run_train(tmp_path, "--config.max_steps=5", "--config.eval.every_steps=100",
                   "--config.eval.at_start=true")
  assert proc.returncode == 0, proc.stderr
  assert [r["step"] for r in _evals(tmp_path)] == [0, 5]


@pytest.mark.slow
def test_eval_under_two_ranks_is_the_same_whichever_rank_floods(tmp_path):
  runs = {}
  for root in (0, 1):
    work = tmp_path / f"root{root}"
    proc = run_train(work, "--config.max_steps=20", "--config.eval.every_steps=10",
                     f"--config.eval.rank={root}", ranks=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs[root] = read_metrics(work)
  strip = lambda r: {k: v for k, v in r.items()  # noqa: E731
                     if k not in ("eval_s", "best", "wall_s")}
  evals = {root: [strip(r) for r in recs if r.get("eval")] for root, recs in runs.items()}
  assert [r["step"] for r in evals[0]] == [10, 20]
  assert evals[0] == evals[1]
  assert evals[0][0]["examples"] == 10 * 4  # 2 ranks x batch 2
  for recs in runs.values():
    assert len(set(recs[-1]["rank_fingerprints"])) == 1
  assert runs[0][-1]["params_fingerprint"] == runs[1][-1]["params_fingerprint"]


@pytest.mark.slow
def test_time_based_eval_under_two_ranks_does_not_desync(tmp_path):
  # Ranks' clocks differ; rank 0's decides, so every rank takes part in every eval.
  proc = run_train(tmp_path, "--config.max_steps=30", "--config.eval.every_s=0.3",
                   "--config.sync_check_every=5", ranks=2)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  records = read_metrics(tmp_path)
  assert len([r for r in records if r.get("eval")]) >= 2
  assert len(set(records[-1]["rank_fingerprints"])) == 1


@pytest.mark.slow
def test_bad_eval_settings_are_one_line_errors(tmp_path):
  for override, text in (("--config.eval.rank=3", "eval.rank=3"),
                         ("--config.eval.inference.segment_threshold=1.5", "segment_threshold"),
                         ("--config.eval.best_metric=are", "eval.best_metric"),
                         ("--config.eval.skeleton_min_nodes=0", "eval.skeleton_min_nodes"),
                         ("--config.eval.voxel_size_zyx=(1,0,1)", "eval.voxel_size_zyx"),
                         (f"--config.eval.image={tmp_path}/none.zarr", "eval.labels")):
    proc = run_train(tmp_path / "w", "--config.max_steps=2", "--config.eval.every_steps=1",
                     override)
    assert proc.returncode == 2, (override, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and text in proc.stderr, proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(
        tmp_path / "w" / "checkpoints")


# -- TensorBoard -----------------------------------------------------------------------------------
def _tfrecords(path):
  """The records of a TFRecord file (length, crc, data, crc)."""
  with open(path, "rb") as f:
    data = f.read()
  pos, out = 0, []
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    out.append(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4
  return out


@pytest.mark.slow
def test_tensorboard_scalars_match_metrics_jsonl(trained):
  from tensorboardX.proto import event_pb2
  tmp_path = trained[0]
  files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for raw in _tfrecords(files[0]):
    event = event_pb2.Event.FromString(raw)
    for v in event.summary.value:
      scalars[(v.tag, event.step)] = v.simple_value
  for r in read_metrics(tmp_path):
    prefix = "eval/" if r.get("eval") else "final/" if r.get("final") else ""
    for key in ("loss", "f1", "fovs_per_s", "vi", "vi_merge", "are", "erl", "merges", "wall_s"):
      if key in r:
        assert scalars[(prefix + key, r["step"])] == pytest.approx(r[key], rel=1e-6), key


# -- periodic actions --------------------------------------------------------------------------------
def test_periodic_action_schedules():
  ran = []
  by_steps = periodic.PeriodicAction("a", ran.append, every_steps=5, at_end=True)
  assert [s for s in range(1, 13) if by_steps.due(s, 0.0, last=s == 12)] == [5, 10, 12]
  by_time = periodic.PeriodicAction("t", ran.append, every_s=10.0)
  by_time.start(now=100.0)
  assert not by_time.due(1, 105.0, False) and by_time.due(2, 110.0, False)
  by_time(2)
  assert not by_time.due(2, 1e9, False)  # never twice at the same step
  assert ran == [2] and by_time.runs == 1 and by_time.spent_s >= 0
  assert not periodic.PeriodicAction("off", ran.append).enabled


# -- plot ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_plot_draws_each_runs_records(trained, tmp_path):
  """Every panel holds each run's numbers from metrics.jsonl, against steps (top row) and
  examples = step x global batch (bottom row); the VI panel adds split and merge, the ERL panel
  the ERL of a perfect segmentation."""
  from ffn_jax import plot
  shutil.copytree(trained[0], tmp_path / "a")
  shutil.copytree(trained[0], tmp_path / "b")
  records = read_metrics(tmp_path / "b")
  with open(tmp_path / "b" / "metrics.jsonl", "w") as f:  # run b: halve every loss
    for r in records:
      f.write(json.dumps({**r, "loss": r["loss"] / 2} if "loss" in r else r) + "\n")
  train = [r for r in records if "loss" in r and not r.get("eval") and not r.get("final")]
  evals = [r for r in records if r.get("eval")]
  assert train and evals
  fig = plot.draw([str(tmp_path / "a"), str(tmp_path / "b")], ["A", "B"])
  axes = np.asarray(fig.axes).reshape(2, len(plot.PANELS))
  loss = [line.get_ydata() for line in axes[0][0].lines]
  np.testing.assert_allclose(loss[0], [r["loss"] for r in train])
  np.testing.assert_allclose(loss[1], [r["loss"] / 2 for r in train])
  np.testing.assert_array_equal(axes[0][0].lines[0].get_xdata(), [r["step"] for r in train])
  np.testing.assert_array_equal(axes[1][1].lines[0].get_xdata(),
                                [r["step"] * r["global_batch"] for r in train])
  np.testing.assert_allclose(axes[0][1].lines[1].get_ydata(), [r["f1"] for r in train])
  vi_lines = axes[0][2].lines
  assert len(vi_lines) == 6  # (VI, split, merge) per run
  for line, key in zip(vi_lines[:3], ("vi", "vi_split", "vi_merge")):
    np.testing.assert_allclose(line.get_ydata(), [r[key] for r in evals])
  erl_lines = axes[1][3].lines
  assert len(erl_lines) == 4  # (ERL, perfect ERL) per run
  for line, key in zip(erl_lines[:2], ("erl", "erl_max")):
    np.testing.assert_allclose(line.get_ydata(), [r[key] for r in evals])
  np.testing.assert_array_equal(erl_lines[2].get_xdata(), [r["examples"] for r in evals])
  assert axes[0][3].get_title().startswith("eval ERL")
  assert [t.get_text() for t in axes[0][0].get_legend().get_texts()] == ["A", "B"]


@pytest.mark.slow
def test_plot_overlays_runs_and_rejects_non_workdirs(trained, tmp_path):
  shutil.copytree(trained[0], tmp_path / "a")
  shutil.copytree(trained[0], tmp_path / "b")  # a second run to overlay
  out = tmp_path / "curves.png"
  proc = subprocess.run([sys.executable, "-m", "ffn_jax.plot", str(tmp_path / "a"),
                         str(tmp_path / "b"), "--out", str(out)], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
  proc = subprocess.run([sys.executable, "-m", "ffn_jax.plot", str(tmp_path / "nothing")],
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_end_of_training_calibration_is_stored_for_infer(tmp_path):
  """eval.calibrate: after the last step the final (moving-average) model's flood settings are
  searched on the eval box, recorded in metrics.jsonl and stored in WORKDIR/calibration.json
  for the last checkpoint, where infer.py finds them."""
  from ffn_jax import calibration
  proc = run_train(tmp_path, "--config.max_steps=4", "--config.eval.every_steps=100",
                   "--config.eval.calibrate=true", "--config.optim.ema_decay=0.9")
  assert proc.returncode == 0, proc.stderr
  records = read_metrics(tmp_path)
  assert records[-1].get("final") and [r["step"] for r in records if r.get("eval")] == [4]
  (cal,) = [r for r in records if r.get("calibration")]
  assert cal["step"] == 4 and cal["tries"] == 2 * 4 + 3
  best = {k: cal[k] for k in calibration.KEYS}
  assert calibration.load(str(tmp_path), "latest", 4) == best
  assert calibration.load(str(tmp_path), "latest", 3) is None
  assert "calibrated on the eval box" in proc.stdout


@pytest.mark.slow
def test_time_to_target_is_recorded_once_and_carried_over_a_resume(tmp_path):
  """eval.target_vi: the first eval at or below it writes a target record (step, examples, run
  wall seconds), the final record repeats it, a resumed run neither loses nor repeats it, and
  the plot marks it; an unreachable target leaves the final record's target fields None."""
  from ffn_jax import plot
  reach = ["--config.eval.every_steps=3", "--config.eval.target_vi=100"]
  first = run_train(tmp_path / "w", *reach, "--config.max_steps=6")
  assert first.returncode == 0, first.stderr
  again = run_train(tmp_path / "w", *reach, "--config.max_steps=9")
  assert again.returncode == 0, again.stderr
  records = read_metrics(tmp_path / "w")
  (target,) = [r for r in records if r.get("target")]
  assert (target["step"], target["examples"], target["target_vi"]) == (3, 3 * 2, 100.0)
  evals = [r for r in records if r.get("eval")]
  assert target["wall_s"] == evals[0]["wall_s"] > 0
  assert evals[-1]["wall_s"] > evals[1]["wall_s"]  # the run's wall time goes on over the resume
  final = records[-1]
  assert final["final"] and final["target_step"] == 3 and final["target_wall_s"] == target["wall_s"]
  assert final["run_wall_s"] >= evals[-1]["wall_s"]
  assert "target reached" in first.stdout and "target reached" not in again.stdout

  miss = run_train(tmp_path / "m", "--config.eval.every_steps=3", "--config.eval.target_vi=0.001",
                   "--config.max_steps=3")
  assert miss.returncode == 0, miss.stderr
  final = read_metrics(tmp_path / "m")[-1]
  assert final["target_vi"] == 0.001 and final["target_step"] is None
  fig = plot.draw([str(tmp_path / "w"), str(tmp_path / "m")])
  vi_axes = fig.axes[2]
  assert sorted({line.get_ydata()[0] for line in vi_axes.lines if line.get_linestyle() == "-."}
                ) == [0.001, 100.0]
  assert sum(line.get_marker() == "*" for line in vi_axes.lines) == 1
