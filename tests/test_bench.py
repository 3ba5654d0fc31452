"""bench/ training benchmarks: arithmetic, cost model, result assembly, short real runs."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, load_bench, mpirun, shared_data


common = load_bench("_common")
scaling = load_bench("scaling")
model = load_bench("scaling_model")
study = load_bench("lr_batch_study")


def _run(*argv, timeout=120):
  proc = subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc, json.loads(proc.stdout.strip().splitlines()[-1])


# -- arithmetic ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_param_and_flop_counts_match_the_model():
  import jax

  from ffn_jax.model import FFN, count_params, init_params
  assert common.param_count(12, 32) == 638_433  # Google's FIB-25 model
  params = init_params(FFN(depth=3, features=8, conv_impl="xla"), jax.random.PRNGKey(0), (9, 9, 9))
  assert count_params(params) == common.param_count(3, 8)
  # PERFORMANCE.md counts only the 23 32->32 convs of FIB-25: 45.7 GFLOP per FOV forward.
  assert common.gflop_forward(12, 32, (33, 33, 33)) == pytest.approx(45.7, rel=0.005)


def test_steady_state_skips_warmup_windows():
  records = [{"step": s, "global_batch": 4, "ranks": 1, "fovs_per_s": 4 / t,
              "time_step_s": t - 0.1, "time_allreduce_s": 0.05, "time_data_s": 0.02}
             for s, t in ((1, 30.0), (2, 1.0), (3, 1.2), (4, 1.0))]
  records.append({"final": True, "step": 4})
  s = common.steady_state(records, warmup_steps=1)
  assert s["steps_measured"] == 3 and s["first_measured_step"] == 2
  assert s["step_wall_s"] == pytest.approx(1.0)
  assert s["fovs_per_s"] == pytest.approx(4.0)
  assert s["other_s"] == pytest.approx(1.0 - 0.9 - 0.05 - 0.02)
  with pytest.raises(ValueError):
    common.steady_state(records, warmup_steps=4)


# -- cost model -----------------------------------------------------------------------------------
def test_cost_model_is_ideal_without_communication():
  for nodes in (1, 2, 64, 2048):
    for algo in model.ALGORITHMS:
      assert model.projected_efficiency(1.5, nodes, 2.55e6, 0.0, float("inf"), algo) == 1.0
  assert model.expected_max_normal(1) == 0.0
  assert model.expected_max_normal(2) == pytest.approx(0.564, abs=0.03)


@pytest.mark.parametrize("algo", model.ALGORITHMS)
def test_cost_model_efficiency_decreases_with_ranks(algo):
  effs = [model.projected_efficiency(0.5, n, 4 * 638_433, 2e-6, 12.5e9, algo, jitter_cv=0.02)
          for n in model.node_counts(2048)]
  assert effs[0] == 1.0
  assert all(a > b for a, b in zip(effs, effs[1:]))
  assert 0 < effs[-1] < 1


def test_cost_model_formulas_and_fit():
  n = 4e6
  # Ring: bandwidth term tends to 2 n / B; tree: the whole message at every level.
  assert model.allreduce_time("ring", 2, n, 0.0, 1e9) == pytest.approx(n / 1e9)
  assert model.allreduce_time("tree", 8, n, 1e-6, 1e9) == pytest.approx(6 * (1e-6 + n / 1e9))
  with pytest.raises(ValueError):
    model.allreduce_time("butterfly", 4, n, 0.0, 1e9)
  alpha, beta = model.fit_alpha_beta([4e6, 4, 4e3], [2e-6 + 4e6 / 5e9, 2e-6 + 4 / 5e9,
                                                     2e-6 + 4e3 / 5e9])
  assert alpha == pytest.approx(1e-6, rel=1e-3) and 1 / beta == pytest.approx(5e9, rel=1e-3)
  cv = model.fit_jitter_cv(0.68, 1 / 0.7, 2048, 4 * 638_433, 2e-6, 12.5e9)
  eff = model.projected_efficiency(1 / 0.7, 2048, 4 * 638_433, 2e-6, 12.5e9, "ring", cv)
  assert eff == pytest.approx(0.68, abs=1e-4)


# -- scaling.py -----------------------------------------------------------------------------------
def test_scaling_args_plan_and_assembly():
  args = scaling.parse_args(["--quick", "--config.data.fov_moves=1"])
  assert args.config == "configs/fib25.py" and args.ranks == [1, 2]
  assert args.batch_per_rank == 1 and args.global_batch == 2
  assert args.overrides == ["--config.data.fov_moves=1"]
  # weak (1,1) (2,1); strong (1,2) (2,1); independent 2 x 1 (its 1 is weak's): shared runs once.
  assert scaling.plan_runs(args) == [(1, 1, False), (2, 1, False), (1, 2, False), (2, 1, True)]
  assert scaling.parse_args(["--quick", "--steps", "7"]).steps == 7  # explicit beats --quick
  cmd = scaling.launch_command(args, 2, 1, "/tmp/w")
  assert cmd[1:5] == ["-n", "2", "-bind-to", "core:1"] and "--config.batch_size=1" in cmd
  assert cmd[cmd.index("--workdir") + 1] == "/tmp/w"
  cmd = scaling.launch_command(args, 2, 1, "/tmp/w", independent=True)
  assert cmd[5:7] == ["sh", "-c"] and "--workdir" not in cmd[7:]
  with pytest.raises(SystemExit):
    scaling.parse_args(["--ranks", "1,3", "--global-batch", "4"])

  def stats(fovs, allreduce):
    return {"fovs_per_s": fovs, "step_wall_s": 1.0, "compute_s": 0.9, "allreduce_s": allreduce,
            "data_s": 0.01, "other_s": 0.01, "step_wall_cv": 0.1, "ranks_in_sync": True,
            "cpu_share": 0.9,
            "loadavg_before": [1.0], "loadavg_after": [1.0]}
  runs = {(1, 1, False): stats(1.0, 0.01), (2, 1, False): stats(1.8, 0.05),
          (1, 2, False): stats(1.1, 0.01), (2, 1, True): stats(1.9, 0.01)}
  result = scaling.assemble(args, runs)
  assert result["weak_efficiency"] == pytest.approx(0.9)
  assert result["independent_efficiency"] == pytest.approx(0.95)
  assert result["sync_efficiency"] == pytest.approx(0.9 / 0.95)
  assert result["strong_efficiency"] == pytest.approx(1.8 / 2.2)
  assert result["allreduce_fraction"] == pytest.approx(0.05)
  assert [p["ideal_fovs_per_s"] for p in result["weak"]] == pytest.approx([1.0, 2.0])


@pytest.mark.slow
def test_scaling_quick_two_ranks_end_to_end(tmp_path):
  """The README's `bench/scaling.py --quick` (configs/fib25.py, batch 1 per rank), cut to one
  launch of 2 ranks x 2 measured steps. fib25's segmentation eval is switched off in the timed
  runs (it once crashed the report: an eval record read as a training window)."""
  mpirun()
  _, out = _run("bench/scaling.py", "--quick", "--ranks", "2", "--modes", "weak", "--steps", "2",
                "--out", tmp_path, "--timeout", "300", timeout=360)
  assert out["config"] == "configs/fib25.py" and out["ranks"] == [2]
  assert 0 < out["allreduce_fraction"] < 1
  saved = json.loads((tmp_path / "scaling.json").read_text())
  point = saved["weak"][0]
  assert (point["ranks"], point["batch_per_rank"], point["global_batch"]) == (2, 1, 2)
  assert point["ranks_in_sync"]
  # Throughput is the global batch over the step time, and the phases fit inside the step.
  assert point["fovs_per_s"] == pytest.approx(2 / point["step_wall_s"], rel=0.02)
  assert point["compute_s"] + point["allreduce_s"] <= point["step_wall_s"] * 1.01
  records = [json.loads(line) for line in
             (tmp_path / "runs" / "r2_b1" / "metrics.jsonl").read_text().splitlines()]
  assert not [r for r in records if r.get("eval")]
  assert [r["step"] for r in records if "loss" in r and not r.get("final")] == [1, 2, 3]
  assert (tmp_path / "scaling.png").stat().st_size < 200_000


@pytest.mark.slow
def test_scaling_model_measures_and_projects(tmp_path):
  """`bench/scaling_model.py --measure`: MPI allreduce timed over message sizes on 2 ranks, then
  the projection to 2048 nodes."""
  mpirun()
  _, out = _run("bench/scaling_model.py", "--measure", "--repeats", "3", "--out", tmp_path,
                timeout=300)
  saved = json.loads((tmp_path / "scaling_model.json").read_text())
  measured, projected = saved["measured"], saved["projected"]
  assert measured["ranks"] == 2 and measured["alpha_s"] > 0 and measured["bandwidth_bytes_per_s"] > 0
  times = measured["mpi4py_s"]
  assert len(times) == len(measured["float32_elements"]) and times[-1] > times[0]
  assert projected["nodes"][0] == 1 and projected["nodes"][-1] == 2048
  for curve in projected["efficiency"].values():
    assert curve[0] == pytest.approx(1.0) and all(0 < e <= 1 for e in curve)
    assert all(a >= b - 1e-9 for a, b in zip(curve, curve[1:]))  # never rises with nodes
  assert out["max_nodes"] == 2048


@pytest.mark.slow
@pytest.mark.parametrize("config,extra", [
    ("configs/synthetic.py", ("--steps", "3")),
    ("configs/fib25.py", ("--steps", "1", "--config.data.box_size_zyx=(50,60,60)",
                          "--config.batch_size=1")),
])
def test_train_throughput_on_the_documented_configs(config, extra):
  """`bench/train_throughput.py --config X`: FOV/s and where the step's time goes."""
  _, out = _run("bench/train_throughput.py", "--config", config, *extra, timeout=300)
  assert out["config"] == config and out["fovs_per_s"] > 0
  assert out["depth"] == {"configs/synthetic.py": 3, "configs/fib25.py": 12}[config]
  assert 0.5 < out["compute_fraction"] <= 1 and out["compute_s"] > 0
  assert out["fovs_per_s"] * out["step_wall_s"] == pytest.approx(out["global_batch"], rel=0.02)


# -- lr_batch_study.py ----------------------------------------------------------------------------
def test_time_to_f1_from_records():
  records = [{"step": s, "global_batch": 8, "fovs_per_s": 8.0, "f1": f}
             for s, f in ((5, 0.1), (10, 0.55), (15, 0.7))]
  got = study.time_to_f1(records + [{"final": True, "step": 15}], 0.5)
  assert got == {"steps_to_f1": 10, "examples_to_f1": 80, "seconds_to_f1": pytest.approx(10.0)}
  assert study.time_to_f1(records, 0.9)["steps_to_f1"] is None
  # Smoothed over 2 windows: (0.55 + 0.7) / 2 >= 0.6 first at step 15.
  assert study.time_to_f1(records, 0.6, smooth=2)["steps_to_f1"] == 15


@pytest.mark.slow
def test_lr_batch_study_end_to_end(tmp_path):
  proc, out = _run("bench/lr_batch_study.py", "--config", "configs/tiny.py", "--batches", "2,4",
                   "--rules", "none,linear", "--budget-examples", "16", "--val-fovs", "6",
                   "--f1-target", "0.01", "--f1-smooth", "1", "--out", tmp_path, timeout=90)
  assert len(out["runs"]) == 4
  for run in out["runs"]:
    assert run["status"] == "ok" and run["examples"] >= 16
    assert run["val_loss"] > 0 and 0 <= run["val_f1"] <= 1
    # Held-out segmentation: the final model floods the held-out volume.
    assert run["val_vi"] == pytest.approx(run["val_vi_split"] + run["val_vi_merge"])
    assert run["val_vi"] > 0 and 0 <= run["val_are"] <= 1
  by_name = {r["name"]: r for r in out["runs"]}
  assert by_name["adam_linear_w0_b2"]["lr"] == pytest.approx(by_name["adam_none_w0_b2"]["lr"] / 2)
  # Same LR, batch and data: the two batch-4 runs (reference batch 4) train identically.
  assert by_name["adam_linear_w0_b4"]["val_loss"] == by_name["adam_none_w0_b4"]["val_loss"]
  assert by_name["adam_linear_w0_b4"]["val_vi"] == by_name["adam_none_w0_b4"]["val_vi"]
  assert "| adam_none_w0_b2 |" in (tmp_path / "table.md").read_text()
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["runs"][0]["curve"], "training curves are saved"
  for png in out["plots"]:
    assert 0 < (tmp_path / png.split("/")[-1]).stat().st_size < 200_000
  # A finished study replots (here with another F1 target) without training again.
  _, again = _run("bench/lr_batch_study.py", "--replot", tmp_path, "--out", tmp_path / "re",
                  "--f1-target", "2.0", timeout=60)
  assert len(again["runs"]) == 4 and again["runs"][0]["examples_to_f1"] is None
  assert (tmp_path / "re" / "lr_batch_study.png").exists()


def test_load_config_applies_overrides_in_process():
  """Overrides given to the benchmarks reach the config (not read from this process's argv)."""
  config = common.load_config("configs/tiny.py", ["seed=3", "--config.optim.learning_rate=0.5"])
  assert config.seed == 3 and config.optim.learning_rate == 0.5
  with pytest.raises(SystemExit, match="unknown config key"):
    common.load_config("configs/tiny.py", ["no_such_key=1"])


def test_heldout_fovs_have_the_first_step_seed():
  import numpy as np

  from ffn_jax.model import logit
  config = common.load_config("configs/tiny.py")
  fovs = study.heldout_fovs(config, 5, val_seed=7)
  assert fovs["image"].shape == (5, 9, 9, 9, 1)
  seed = fovs["seed"][..., 0]
  assert np.allclose(seed[:, 4, 4, 4], logit(0.95))
  assert np.isclose(seed, logit(0.05)).sum() == 5 * (9**3 - 1)
  assert set(np.unique(fovs["labels"])) <= {np.float32(0.05), np.float32(0.95)}
  assert np.all(fovs["labels"][:, 4, 4, 4, 0] == np.float32(0.95))


@pytest.mark.slow
def test_conv_stack_workers_end_to_end():
  """One worker process per implementation; a route that cannot run and a peer that is not
  installed are reported and skipped, not fatal."""
  missing = [peer for peer, module in (("torch", "torch"), ("tf", "tensorflow"))
             if importlib.util.find_spec(module) is None]
  if not missing:
    pytest.skip("needs an environment without one of the [compare] peers")
  peer = missing[0]
  proc, out = _run("bench/conv_stack.py", "--fov", "9", "--depth", "2", "--features", "4",
                   "--routes", "im2col_kz,no_such_route", "--peers", f"{peer},{peer}_bf16",
                   "--batches", "2",
                   "--repeats", "2", "--warmup", "1")
  assert "no_such_route skipped" in proc.stdout
  assert f"{peer} skipped" in proc.stdout and "pip install -e .[compare]" in proc.stdout
  assert f"{peer}_bf16 skipped" in proc.stdout
  for mode in ("forward_b2", "train_b2"):
    assert out[mode]["best_route"] == "im2col_kz"
    assert out[mode]["ms_per_fov"]["im2col_kz"] > 0
    assert out[mode]["best_peer"] is None
    assert out[mode]["best_bf16_route"] is None and out[mode]["best_bf16_peer"] is None
  assert out["train_ratio_vs_best_peer"] is None
  assert out["train_bf16_ratio_vs_best_bf16_peer"] is None
  assert out["our_malloc"] == "retain" and out["peer_malloc"] == "default"


@pytest.mark.slow
def test_precision_study_tiny(tmp_path):
  """float32 vs bfloat16 conv route from the same seed: same curve at first, both scored."""
  _, out = _run("bench/precision_study.py", "--config", "configs/tiny.py", "--steps", "12",
                "--log-points", "3", "--val-fovs", "4", "--out", tmp_path, timeout=300)
  from ffn_jax import conv
  routes = [conv.select("auto", dtype)[0] for dtype in ("float32", "bfloat16")]
  assert out["routes"] == routes and out["eval_route"] == routes[0]
  ref, bf16 = out["runs"][routes[0]], out["runs"][routes[1]]
  assert [p["step"] for p in ref["curve"]] == [p["step"] for p in bf16["curve"]] == [4, 8, 12]
  # The first window sees the same FOVs with nearly the same weights.
  assert abs(ref["curve"][0]["loss"] - bf16["curve"][0]["loss"]) < 0.05
  for run in (ref, bf16):
    assert run["val_loss"] > 0 and 0 <= run["val_f1"] <= 1 and run["fovs_per_s"] > 0
    assert run["val_vi"] == pytest.approx(run["val_vi_split"] + run["val_vi_merge"])
  assert out["val_vi_diff"] == pytest.approx(bf16["val_vi"] - ref["val_vi"])


# -- baseline_watershed.py -------------------------------------------------------------------------
def test_watershed_baseline_chooses_on_training_data_and_beats_trivial_segmentations():
  import numpy as np

  from ffn_jax import evaluation
  from ffn_jax.data import synthetic
  ws = load_bench("baseline_watershed")
  train = synthetic.make_volume((24, 48, 48), n_objects=10, seed=0)
  test = synthetic.make_volume((24, 48, 48), n_objects=10, seed=1)
  # The old flat grid: the threshold method flooded over the seed image.
  grid = {"sigma": (0.5, 1.5), "seed_threshold": (0.0, 0.75), "min_seed": (0, 50)}
  result = ws.run_baseline(*train, *test, grid=grid, log=lambda *a: None)
  assert result["grid_size"] == 8
  # The chosen parameters are the training-volume optimum ...
  _, rows = ws.grid_search(*train, grid=grid, log=lambda *a: None)
  assert result["train"]["vi"] == min(r["vi"] for r in rows)
  assert set(result["params"]) == set(ws.PARAM_KEYS)
  assert result["params"]["method"] == "threshold" and result["params"]["flood"] == "gradient"
  assert result["params"]["flood_sigma"] == result["params"]["sigma"]
  # ... and on held-out data they beat the trivial segmentation (everything one segment).
  seg = result["segmentation"]
  assert seg.shape == test[1].shape and seg.min() > 0
  one = evaluation.evaluate_segmentation(np.ones_like(test[1]), test[1])["vi"]
  assert result["test"]["vi"] < 0.8 * one, (result["test"], one)


def test_watershed_hmax_markers_are_the_extended_maxima():
  """hmax_levels' markers are the regional maxima of the reconstruction by dilation of q - h
  under q (MATLAB's imextendedmax), computed here the slow way; clipping keeps a subset."""
  import numpy as np
  from scipy import ndimage
  ws = load_bench("baseline_watershed")
  cross = ndimage.generate_binary_structure(3, 1)

  def reconstruct(marker, mask):
    r = np.minimum(marker, mask)
    while True:
      grown = np.minimum(ndimage.grey_dilation(r, footprint=cross), mask)
      if np.array_equal(grown, r):
        return r
      r = grown

  rng = np.random.default_rng(0)
  image = ndimage.gaussian_filter(rng.normal(size=(10, 18, 18)), 1.5)
  image = ((image - image.mean()) / image.std()).astype(np.float32)
  q = np.floor(image / ws.HMAX_STEP).astype(np.int64)
  levels = ws.hmax_levels(image, (0.25, 1.0), ws.HMAX_STEP)
  for h in (0.25, 1.0):
    k = int(round(h / ws.HMAX_STEP))
    rec = reconstruct(q - k, q)
    expected = (rec - reconstruct(rec - 1, rec)) > 0  # regional maxima of rec
    assert np.array_equal(levels[h] != ws._NONE, expected), h
  few, many = (ndimage.label(levels[h] != ws._NONE)[1] for h in (1.0, 0.25))
  assert 1 <= few < many
  clipped = ws.hmax_seeds(levels[0.25], ws.HMAX_STEP, 0.5, 0) > 0
  assert clipped.any() and np.all(image[clipped] >= 0.5 - 1e-6)
  assert np.all(levels[0.25][clipped] != ws._NONE)


def test_watershed_level_flood_is_the_exact_minimax_flood():
  """flood "level": every voxel goes to a seed whose path over the relief r (inverted image) has
  the lowest highest step r[p] + r[q] (6-neighbours, no wrap-around at the faces), checked
  against Dijkstra; scipy's watershed_ift on the image as is ("gradient") is not that flood."""
  import heapq
  import itertools

  import numpy as np
  from scipy import ndimage
  ws = load_bench("baseline_watershed")
  rng = np.random.default_rng(1)
  image = ndimage.gaussian_filter(rng.normal(size=(6, 9, 11)), 1.0).astype(np.float32)
  smooth = ws.smoothed(image, 0)
  seeds = np.zeros(smooth.shape, np.int32)
  seeds.flat[rng.choice(smooth.size, 4, replace=False)] = np.arange(1, 5)
  relief = np.round((smooth.max() - smooth) / np.ptp(smooth) * ws._LEVELS).astype(np.int64)

  def minimax_cost(start):
    cost = np.full(smooth.shape, np.iinfo(np.int64).max)
    cost[start] = 0
    heap = [(0, start)]
    while heap:
      c, p = heapq.heappop(heap)
      if c > cost[p]:
        continue
      for axis, step in itertools.product(range(3), (-1, 1)):
        q = list(p)
        q[axis] += step
        q = tuple(q)
        if 0 <= q[axis] < smooth.shape[axis] and max(c, relief[p] + relief[q]) < cost[q]:
          cost[q] = max(c, relief[p] + relief[q])
          heapq.heappush(heap, (cost[q], q))
    return cost

  costs = np.stack([minimax_cost(tuple(np.argwhere(seeds == k)[0])) for k in range(1, 5)])
  for flood, exact in (("level", True), ("gradient", False)):
    seg = ws.flood(smooth, seeds, flood)
    assert seg.shape == smooth.shape and set(np.unique(seg)) == {1, 2, 3, 4}
    assert np.all(seg[seeds > 0] == seeds[seeds > 0])
    got = np.take_along_axis(costs, seg[None].astype(np.int64) - 1, 0)[0]
    assert np.array_equal(got, costs.min(0)) == exact, flood


def test_watershed_seed_methods_find_sensible_seeds():
  """Two bright blobs: hmax splits them only for h below the dip between them; two balls
  joined by a thin bridge are one threshold component but two distance seeds."""
  import numpy as np
  from scipy import ndimage
  ws = load_bench("baseline_watershed")
  z, y, x = np.mgrid[:16, :24, :40].astype(np.float32)
  bumps = np.exp(-((z - 8) ** 2 + (y - 12) ** 2 + (x - 12) ** 2) / 18) + \
      0.8 * np.exp(-((z - 8) ** 2 + (y - 12) ** 2 + (x - 28) ** 2) / 18)
  smooth = ws.smoothed(bumps, 0)
  dip = smooth[8, 12, 12:29].min()
  second = smooth[8, 12, 28]
  for h, count in ((0.5 * (second - dip), 2), (1.5 * (second - dip), 1)):
    params = {"method": "hmax", "sigma": 0, "flood_sigma": 0, "flood": "level",
              "seed_threshold": None, "h": float(h), "min_seed": 0}
    seeds = ws.seeds_for(params, smooth)
    assert seeds.max() == count, (h, seeds.max())
    seg = ws.segment(bumps, params)
    assert len(np.unique(seg)) == count and seg.min() > 0
  # Dumbbell: two balls of radius 6, a bridge of radius 1.5; dark outside, brighter inwards.
  balls = ((z - 8) ** 2 + (y - 12) ** 2 + (x - 10) ** 2 <= 36) | \
      ((z - 8) ** 2 + (y - 12) ** 2 + (x - 30) ** 2 <= 36) | \
      (((z - 8) ** 2 + (y - 12) ** 2 <= 2.25) & (x > 10) & (x < 30))
  image = (50 + 20 * ndimage.distance_transform_edt(balls)).astype(np.float32)
  smooth = ws.smoothed(image, 0)
  common = {"sigma": 0, "flood_sigma": 0, "flood": "level", "seed_threshold": 0.0, "min_seed": 0}
  assert ws.seeds_for({**common, "method": "threshold", "h": None}, smooth).max() == 1
  seeds = ws.seeds_for({**common, "method": "distance", "h": 2.0}, smooth)
  assert seeds.max() == 2
  assert seeds[8, 12, 10] != seeds[8, 12, 30] and seeds[8, 12, 10] > 0 and seeds[8, 12, 30] > 0
  seg = ws.segment(image, {**common, "method": "distance", "h": 2.0})
  # Each ball's core (brighter than the bridge) floods from its own seed; 2 segments in all.
  assert seg[8, 12, 7] == seg[8, 12, 10] != seg[8, 12, 33] == seg[8, 12, 30]
  assert len(np.unique(seg)) == 2 and seg.min() > 0


def test_watershed_grid_of_every_method_picks_the_best_training_setting():
  import numpy as np

  from ffn_jax import evaluation
  from ffn_jax.data import synthetic
  ws = load_bench("baseline_watershed")
  train = synthetic.make_volume((24, 48, 48), n_objects=10, seed=0)
  test = synthetic.make_volume((24, 48, 48), n_objects=10, seed=1)
  grid = {"sigma": (1.0,), "flood_sigma": ("same", 0.0), "flood": ("level",),
          "methods": {"threshold": {"seed_threshold": (0.0, 0.5), "min_seed": (0, 50)},
                      "hmax": {"h": (0.5, 1.5), "seed_threshold": (None, 0.0), "min_seed": (0,)},
                      "distance": {"seed_threshold": (0.0,), "h": (1.0, 2.0), "min_seed": (0,)}}}
  result = ws.run_baseline(*train, *test, grid=grid, log=lambda *a: None)
  assert result["grid_size"] == 2 * (4 + 4 + 2)
  _, rows = ws.grid_search(*train, grid=grid, log=lambda *a: None)
  assert {r["method"] for r in rows} == set(ws.METHODS)
  assert {r["flood_sigma"] for r in rows} == {1.0, 0.0} and {r["flood"] for r in rows} == {"level"}
  best = min(rows, key=lambda r: r["vi"])
  assert result["params"] == ws.params_of(best)
  assert result["train"]["vi"] == best["vi"]
  assert set(result["best_train_by_method"]) == set(ws.METHODS)
  # Every method segments the volume: every voxel labelled, better than one segment.
  one = evaluation.evaluate_segmentation(np.ones_like(train[1]), train[1])["vi"]
  for method, b in result["best_train_by_method"].items():
    assert b["vi"] < 0.8 * one, (method, b)
    assert next(r for r in rows if ws.params_of(r) == ws.params_of(b))["seeds"] >= 5
  # The chosen setting applied alone reproduces its training score (the grid's shared sweeps
  # give the same seeds as one setting), and the test segmentation is that setting's.
  assert ws.score(ws.segment(train[0], result["params"]), train[1])["vi"] == \
      pytest.approx(best["vi"], abs=1e-12)
  assert np.array_equal(result["segmentation"], ws.segment(test[0], result["params"]))
  restricted = ws.restrict_grid(grid, methods=["hmax"], flood_sigmas=["same"])
  assert list(restricted["methods"]) == ["hmax"] and restricted["flood_sigma"] == ("same",)
  with pytest.raises(ValueError):
    ws.restrict_grid(grid, methods=["bogus"])


@pytest.mark.slow
def test_watershed_baseline_cli_on_gala(tmp_path):
  """The README's `bench/baseline_watershed.py --dataset gala`, as written: parameters chosen
  on gala_train alone over all three seed methods, gala_test scored at the documented VI 0.287
  (docs/quality.md; about 5 min on 2 cores)."""
  shared_data("gala_train", "labels.zarr")
  shared_data("gala_test", "labels.zarr")
  _, out = _run("bench/baseline_watershed.py", "--dataset", "gala", "--out",
                tmp_path / "ws.zarr", timeout=1200)
  assert out["grid_size"] == 1155
  assert set(out["best_train_by_method"]) == {"threshold", "hmax", "distance"}
  assert out["params"]["method"] == "hmax" and out["params"]["flood"] == "level"
  assert out["test"]["vi"] == pytest.approx(0.287, abs=1e-3)
  assert out["train"]["vi"] < out["test"]["vi"]  # chosen on train: fitted there
  from ffn_jax.data import volumes
  assert volumes.open_volume(str(tmp_path / "ws.zarr")).shape == (50, 100, 200)


@pytest.mark.slow
def test_watershed_old_threshold_baseline_on_gala():
  """`--grid old` is the old baseline (threshold seeds, gradient flood): VI 2.708."""
  shared_data("gala_train", "labels.zarr")
  shared_data("gala_test", "labels.zarr")
  _, out = _run("bench/baseline_watershed.py", "--dataset", "gala", "--grid", "old", timeout=300)
  assert out["grid_size"] == 105 and out["params"]["flood"] == "gradient"
  assert out["test"]["vi"] == pytest.approx(2.708, abs=1e-3)


@pytest.mark.slow
def test_inference_bench_on_c64(google_checkpoint):
  """`bench/inference.py --crop c64`: Google's model as TensorFlow runs it (67 FOV calls,
  VI 1.763 on c64: tests/test_inference_fib25.py)."""
  shared_data("fib25_training_sample2", "labels.zarr")
  _, out = _run("bench/inference.py", "--crop", "c64", "--checkpoint", google_checkpoint,
                timeout=600)
  run = out["batch1"]
  assert run["fov_calls"] == 67 and run["vi"] <= 1.763 + 5e-4
  assert run["vi"] == pytest.approx(run["vi_split"] + run["vi_merge"])
  assert out["reference_tf"] is not None and run["vi_vs_official"] is not None


def test_canvas_host_bench_runs_the_canvas_with_a_label_oracle():
  shared_data("fib25_training_sample2", "labels.zarr")
  proc, out = _run("bench/canvas_host.py", "--crop", "c64", "--repeats", "2")
  assert json.loads(proc.stdout.splitlines()[0])["code"] == str(REPO / "ffn_jax")
  assert out["fov_calls"] > 50 and out["segments"] >= 1
  assert 0 < out["host_ms_per_fov"] and 0 < out["oracle_s"] < out["loop_s"]
  assert len(out["host_ms_per_fov_all"]) == 2


@pytest.mark.slow
def test_gpu_check_runs_every_step_in_dry_mode():
  """bench/gpu_check.py (the device check) at tiny sizes on whatever backend is here: every step
  runs and reports, the imported model matches TensorFlow's logits, one JSON line at the end."""
  from conftest import shared_data
  data = shared_data()
  shared_data("google_ffn_fib25", "reference_logits.npz")
  _, out = _run("bench/gpu_check.py", "--data", data, "--dry", timeout=600)
  assert {s: v["status"] for s, v in out["steps"].items()} == {
      "logits": "ok", "conv_stack": "ok", "train": "ok", "inference": "ok"}
  assert out["logits"]["ok"] and out["logits"]["max_abs_diff"] <= 1e-4
  for dtype in ("float32", "bfloat16"):
    assert out["conv_stack"][f"jax_{dtype}"]["train_fovs_per_s"] > 0
    assert out["train"][dtype]["fovs_per_s"] > 0
  assert out["inference"]["dry"]["fov_calls"] > 0 and 0 <= out["inference"]["dry"]["vi"] < 10


def test_eta_accuracy_records_an_infer_run_and_scores_each_estimator(tmp_path):
  """`bench/eta_accuracy.py --trace T -- INFER_ARGS`: infer.py runs as usual (its segmentation
  written), the trace holds what the progress line reads plus an end record, and the score
  compares each estimator's ETA with the time left; an existing trace is never overwritten."""
  from conftest import write_infer_assets
  image, ckpt = write_infer_assets(tmp_path, 28)
  trace = tmp_path / "trace.jsonl"
  infer_args = ["--", "--config", "configs/fib25_infer.py", "--workdir", tmp_path / "w",
                f"--config.checkpoint={ckpt}", f"--config.image={image}",
                "--config.bbox_start_zyx=(2,2,2)", "--config.bbox_size_zyx=(24,24,24)",
                "--config.image_mean=-1", "--config.image_stddev=-1",
                "--config.inference.min_segment_size=100", "--config.progress_interval_s=-1"]
  _, out = _run("bench/eta_accuracy.py", "--trace", trace, "--every-s", "0", "--from", "0",
                *infer_args, timeout=600)
  assert (tmp_path / "w" / "segmentation.zarr").exists()
  rows = [json.loads(line) for line in open(trace)]
  assert rows[-1]["end"] and rows[-1]["fov"] == out["fov_calls"] > 0
  assert {"fov", "open", "covered", "covered0", "size", "t"} <= set(rows[0])
  for name in ("candidates", "coverage", "product"):
    score = out[name]
    assert score["lines"] > 0 and 0 <= score["within_2x"] <= 1
    assert score["ratio_min"] <= score["ratio_max"]
  assert out["product"]["ratio_min"] >= min(out["candidates"]["ratio_min"],
                                            out["coverage"]["ratio_min"])
  _, again = _run("bench/eta_accuracy.py", "--trace", trace, "--from", "0")  # score only
  assert again["product"] == out["product"]
  proc = subprocess.run([sys.executable, "bench/eta_accuracy.py", "--trace", str(trace),
                         *map(str, infer_args)], cwd=REPO, env=cli_env(), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and "exists" in proc.stderr and len(rows) == len(open(trace).readlines())


def test_border_study_scores_shells_by_distance_to_the_block_faces(tmp_path):
  """A segmentation right except for one merge in its outer shell: the error shows in the
  0-2 shell only, and the whole-volume reference is scored on the same box and shells."""
  import numpy as np

  from ffn_jax.data import volumes
  border_study = load_bench("border_study")
  assert border_study.edge_distance((5, 4, 6))[2, 1, 3] == 1
  assert border_study.edge_distance((5, 4, 6)).max() == 1
  truth = np.zeros((12, 12, 12), np.uint32)
  truth[:, :6], truth[:, 6:] = 1, 2
  volumes.write_zarr(str(tmp_path / "truth.zarr"), truth)
  volumes.write_zarr(str(tmp_path / "reference.zarr"), truth)
  seg = truth[2:10, 2:10, 2:10].copy()
  seg[0] = 1  # merges the two objects in the first slice of the box
  volumes.write_zarr(str(tmp_path / "seg.zarr"), seg, attrs={"offset_zyx": [2, 2, 2]})
  result = border_study.main([str(tmp_path / "seg.zarr"), "--truth", str(tmp_path / "truth.zarr"),
                              "--reference", str(tmp_path / "reference.zarr"), "--shells", "0,2"])
  rows = result[str(tmp_path / "seg.zarr")]
  assert rows["offset_zyx"] == [2, 2, 2] and rows["shape_zyx"] == [8, 8, 8]
  assert rows["segmentation"]["0-2"]["vi_merge"] > 0.1
  assert rows["segmentation"]["2-"]["vi"] == 0 and rows["reference"]["all"]["vi"] == 0
  assert rows["segmentation"]["0-2"]["fraction"] == round(1 - 4**3 / 8**3, 3)
  proc = subprocess.run([sys.executable, "bench/border_study.py", str(tmp_path / "seg.zarr"),
                         "--truth", str(tmp_path / "truth.zarr"), "--shells", "2,4"], cwd=REPO,
                        env=cli_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error:"), proc.stderr
  assert "--shells" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_seed_halo_counts_the_tiles_whose_seeds_equal_one_keyed_pass(tmp_path):
  """bench/seed_halo.py on a synthetic volume: without a halo the tiles' seeds differ from one
  keyed pass's, with a wide one every tile's equal its share."""
  from conftest import write_infer_assets
  image, ckpt = write_infer_assets(tmp_path, 48)
  out = load_bench("seed_halo").main([
      f"--config.image={image}", f"--config.checkpoint={ckpt}", "--config.image_mean=-1",
      "--config.image_stddev=-1", "--config.tile_size_zyx=(24,24,24)",
      "--config.tile_overlap_zyx=(10,10,10)", "--halos", "0", "40"])
  rows = {r["halo"]: r for r in out["rows"]}
  assert out["seeds_whole"] > 0 and rows[0]["tiles"] == rows[40]["tiles"] == 27
  assert rows[0]["tiles_equal"] < 27 and rows[0]["seeds_added"] + rows[0]["seeds_lacking"] > 0
  assert rows[40]["tiles_equal"] == 27 and rows[40]["seeds_added"] == rows[40]["seeds_lacking"] == 0
  assert rows[0]["largest_window_voxels"] < rows[40]["largest_window_voxels"] <= 48 ** 3


@pytest.mark.slow
def test_time_to_quality_reads_runs_and_projects_hours_by_node_count(tmp_path):
  """bench/time_to_quality.py on two tiny runs with validation evals: the first eval at or
  below the target, the training time until then, a test score read from evaluate's JSON, and
  hours on N nodes only where the global batch covers N."""
  from conftest import run_train
  time_to_quality = load_bench("time_to_quality")
  for name, batch in (("b2", 2), ("b4", 4)):
    proc = run_train(tmp_path / name, "--config.max_steps=6", "--config.eval.every_steps=3",
                     f"--config.batch_size={batch}", "--config.log_every=3")
    assert proc.returncode == 0, proc.stderr
  (tmp_path / "test.json").write_text('VI 1.0 ...\n{"vi": 1.25, "vi_split": 1.0}\n')
  proc, out = _run("bench/time_to_quality.py", "--target-vi", "100", tmp_path / "b2",
                   tmp_path / "b4", "--test", f"b2={tmp_path / 'test.json'}", "--nodes", "1,2,4,8",
                   "--out", tmp_path / "ttq", timeout=120)
  rows = {r["name"]: r for r in json.loads((tmp_path / "ttq" / "results.json").read_text())["runs"]}
  for name, batch in (("b2", 2), ("b4", 4)):
    r = rows[name]
    assert r["global_batch"] == batch and r["steps_to_target"] == 3
    assert r["examples_to_target"] == 3 * batch and r["train_s_to_target"] > 0
    assert r["wall_s_to_target"] == r["evals"][0]["wall_s"] > 0
    assert [n for n, s in r["seconds_on"].items() if s is not None] == [
        n for n in ("1", "2", "4", "8") if int(n) <= batch]
  assert rows["b2"]["test_vi"] == 1.25 and rows["b4"]["test_vi"] is None
  assert rows["b4"]["seconds_on"]["1"] > rows["b4"]["seconds_on"]["4"] > 0
  table = (tmp_path / "ttq" / "table.md").read_text()
  assert "| b2 | 2 |" in table and "| on 1 | on 2 | on 4 | on 8 |" in table
  assert time_to_quality._duration(7200) == "2.00 h" and time_to_quality._duration(90) == "1.5 min"
  assert time_to_quality._duration(9.6) == "10 s" and time_to_quality._duration(None) == "–"
  assert out["target_vi"] == 100 and (tmp_path / "ttq" / "time_to_quality.png").exists()
  # A target no run reaches (the usual case for a tight target and large batches) still gives
  # the table and the plot, with every "to target" column empty.
  proc, out = _run("bench/time_to_quality.py", "--target-vi", "1e-9", tmp_path / "b2",
                   tmp_path / "b4", "--out", tmp_path / "none", timeout=120)
  runs = json.loads((tmp_path / "none" / "results.json").read_text())["runs"]
  assert [r["steps_to_target"] for r in runs] == [None, None]
  assert all(s is None for r in runs for s in r["seconds_on"].values())
  assert (tmp_path / "none" / "time_to_quality.png").exists()
  assert "| b2 | 2 |" in (tmp_path / "none" / "table.md").read_text()
