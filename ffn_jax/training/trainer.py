"""What a training run carries from step to step, in one place (nanodo's ``Trainer``, the flax
examples' loop state): the train state and its step, this rank's examples, the checkpoint
manager, the metric writer and window, the watchdog, and the periodic actions (log, eval, sync
check, checkpoint: ``periodic.PeriodicAction``) that act on them.

``training/loop.py`` builds it and drives it: ``train_step`` then the due actions, until the
last step. Everything here that writes (metrics, checkpoints, the best parameters) writes on
rank 0 only; every collective is taken by every rank in the same order.
"""
from __future__ import annotations

import json
import math
import time

import jax
import numpy as np

from ffn_jax import calibration
from ffn_jax import checkpoint as ckpt_lib
from ffn_jax.training import periodic
from ffn_jax.training.state import checkpoint_tree, model_meta, params_fingerprint
from ffn_jax.training.writers import MetricWindow


class TrainingDiverged(Exception):
  """Loss became NaN/inf, or ranks no longer hold identical parameters."""


class Trainer:
  """The state of one run and the work it does; see the module docstring.

  Args:
    config: the training config.
    workdir: the run's folder (absolute).
    dist: ``parallel.Dist``.
    state: the ``TrainState`` to continue from (on this rank's first device).
    step_fn: ``DistributedStep``: (state, batch) -> (state, stats, logits, times).
    examples: this rank's ``RecurrentExamples``.
    manager, writer, watchdog, log: checkpoint manager, ``MetricWriter``, ``Watchdog``, logger.
    schedule: the learning-rate schedule (logged).
    evaluator: ``seg_eval.SegmentationEval`` or None.
    resumed: whether ``state`` came from this run's own checkpoint (its step is saved).
    global_batch: examples per step over all ranks.
    restored_meta: that checkpoint's meta (the run's wall time and target record so far).
  """

  def __init__(self, config, workdir: str, dist, state, step_fn, examples, manager, writer,
               watchdog, log, schedule, evaluator, resumed: bool, global_batch: int,
               restored_meta: dict | None = None):
    self.config, self.workdir, self.dist, self.state = config, workdir, dist, state
    self.step_fn, self.examples = step_fn, examples
    self.manager, self.writer, self.watchdog, self.log = manager, writer, watchdog, log
    self.schedule, self.evaluator = schedule, evaluator
    self.global_batch = global_batch
    self.step = int(state.step)
    self.last_saved = self.step if resumed else -1
    self.resumed = resumed
    self.window = MetricWindow(global_batch, dist.size, dist.local_devices)
    self.t_start, self.step_start = time.perf_counter(), self.step
    meta = restored_meta or {}
    self.wall0 = float(meta.get("wall_s", 0.0))  # of the launches before this one
    self.target_vi = float(config.eval.get("target_vi", 0.0)) if evaluator is not None else 0.0
    self.target = meta.get("target")  # the first eval record at or below target_vi
    self.best = None
    if evaluator is not None and config.eval.keep_best and dist.is_primary:
      self.best = ckpt_lib.BestParams(ckpt_lib.best_dir(workdir),
                                      config.eval.get("best_metric", "vi"))
    self.actions = [
        periodic.PeriodicAction("log", self.log_window, every_steps=config.log_every,
                                at_end=True),
        periodic.PeriodicAction("sync", self.check_sync, every_steps=config.sync_check_every),
        periodic.PeriodicAction("checkpoint", self.save, every_steps=config.checkpoint_every,
                                at_end=True),
    ]
    self.eval_action = None
    if evaluator is not None:
      self.eval_action = periodic.PeriodicAction(
          "eval", self.evaluate, every_steps=config.eval.every_steps,
          every_s=config.eval.every_s, at_end=True)
      self.actions.insert(1, self.eval_action)  # after the log line, before sync check and save

  # -- the step ----------------------------------------------------------------------------------
  def train_step(self) -> None:
    """One step: the next batch, the distributed update, the examples' next moves."""
    debug = self.config.debug
    t_data = time.perf_counter()
    batch = self.examples.next_batch()
    t_data = time.perf_counter() - t_data
    if debug.perturb_at_step == self.step and debug.perturb_rank == self.dist.rank:
      self.state = self.state.replace(
          params=jax.tree_util.tree_map(lambda p: p * 1.001, self.state.params))
    self.state, stats, logits, times = self.step_fn(self.state, batch)
    if debug.nan_at_step == self.step:
      stats["loss"] = np.float32("nan")
    self.examples.update(logits)
    self.step += 1
    self.watchdog.beat(f"after step {self.step}")
    loss = float(stats["loss"])
    if not math.isfinite(loss):
      raise TrainingDiverged(
          f"loss is {loss} at step {self.step}; stopping. The last good checkpoint "
          f"(step {self.last_saved if self.last_saved >= 0 else 'none'}) is kept in "
          f"{self.manager.directory}")
    self.window.add(stats, times, t_data)

  def due_actions(self) -> tuple[list[periodic.PeriodicAction], bool]:
    """The actions due after this step, as every rank agrees, and whether any got SIGTERM."""
    return periodic.agreed_due(self.actions, self.dist, self.step,
                               self.step == self.config.max_steps,
                               self.watchdog.sigterm_at is not None)

  def sigterm_agreed(self) -> bool:
    """Whether any rank got SIGTERM (a collective)."""
    return self.dist.agree([], self.watchdog.sigterm_at is not None)[1]

  # -- the periodic work -------------------------------------------------------------------------
  def log_window(self, at_step: int) -> None:
    now = time.perf_counter()
    record = self.window.record(at_step, float(self.schedule(at_step - 1)), now)
    self.writer.write(record)
    max_steps = self.config.max_steps
    eta = (now - self.t_start) / max(at_step - self.step_start, 1) * (max_steps - at_step)
    self.log(f"step {at_step}/{max_steps} loss {record['loss']:.4f} "
             f"f1 {record['f1']:.3f} lr {record['learning_rate']:.2e} "
             f"{record['fovs_per_s']:.2f} FOV/s  ETA {_fmt_eta(eta)}")
    self.window.reset(now)

  def save(self, at_step: int, delay_s: float = 0.0) -> None:
    self.watchdog.beat(f"while saving the checkpoint of step {at_step}")
    gathered = self.dist.allgather(self.examples.state())
    if self.dist.is_primary:
      if delay_s:
        time.sleep(delay_s)  # tests only: a save slower than the preemption grace
      ckpt_lib.save(self.manager, at_step, checkpoint_tree(jax.device_get(self.state), gathered),
                    self.run_meta())
    self.dist.barrier()
    self.watchdog.beat(f"after saving the checkpoint of step {at_step}")
    self.last_saved = at_step

  def evaluate(self, at_step: int) -> None:
    self.watchdog.beat(f"while evaluating at step {at_step}")
    params = jax.device_get(self.state.eval_params)
    scores = self.evaluator(params)
    record = {"eval": True, "step": at_step, "examples": at_step * self.global_batch, **scores}
    self.window.exclude(record["eval_s"])
    record["wall_s"] = round(self.wall_s(), 3)
    if self.best is not None:
      record["best"] = self.best.offer(at_step, params, record, self.run_meta())
    self.writer.write(record)
    erl = "n/a" if record["erl"] is None else f"{record['erl']:.1f} of {record['erl_max']:.1f}"
    self.log(f"eval at step {at_step}: VI {record['vi']:.3f} (split {record['vi_split']:.3f}, "
             f"merge {record['vi_merge']:.3f}) ARE {record['are']:.3f}, ERL {erl} "
             f"({record['merges']} merges, {record['splits']} splits), {record['segments']} "
             f"segments, {100 * record['fraction_labelled']:.0f}% labelled, "
             f"{record['fov_calls']} FOVs, {record['eval_s']:.1f} s"
             + (" (best so far)" if record.get("best") else ""))
    if self.target_vi > 0 and self.target is None and record["vi"] <= self.target_vi:
      self.target = {"target": True, "target_vi": self.target_vi, "step": at_step,
                     "examples": record["examples"], "wall_s": record["wall_s"],
                     "vi": record["vi"]}
      self.writer.write(self.target)
      self.log(f"target reached: eval VI {record['vi']:.3f} <= {self.target_vi} at step "
               f"{at_step} ({record['examples']} examples, {record['wall_s'] / 60:.1f} min)")
    self.watchdog.beat(f"after evaluating at step {at_step}")

  def check_sync(self, at_step: int) -> None:
    if self.dist.size == 1:
      return
    prints = self.rank_fingerprints()
    if len(set(prints)) != 1:
      bad = [r for r, p in enumerate(prints) if p != prints[0]]
      raise TrainingDiverged(f"ranks diverged at step {at_step}: parameters of rank(s) {bad} "
                             "differ from rank 0; aborting all ranks")

  # -- start and end -----------------------------------------------------------------------------
  def start(self) -> None:
    """The evaluation of the starting point (``eval.at_start``, fresh runs), then the clocks."""
    if self.eval_action is not None and self.config.eval.at_start and self.step == 0 \
        and not self.resumed:
      self.eval_action(0)  # the starting point: e.g. the pretrained model before fine-tuning
    self.watchdog.beat(f"in step {self.step + 1} (the first of this run compiles)")
    for action in self.actions:
      action.start()

  def calibrate(self) -> None:
    """``eval.calibrate``: the final model's flood settings, tuned on the eval box, stored in
    ``WORKDIR/calibration.json`` for this step's checkpoint (``ffn_jax.calibration``)."""
    self.watchdog.beat(f"while calibrating the flood settings at step {self.step}")
    t0 = time.perf_counter()
    best, rows = self.evaluator.calibrate(jax.device_get(self.state.eval_params), self.log)
    seconds = time.perf_counter() - t0
    vi = min(r["vi"] for r in rows)
    self.writer.write({"calibration": True, "step": self.step, **best, "vi": vi,
                       "tries": len(rows), "calibration_s": seconds})
    if self.dist.is_primary:
      calibration.store(self.workdir, "latest", self.step, best,
                        {"vi": vi, "box": "eval", "rows": rows})
    self.log("calibrated on the eval box: " + ", ".join(f"{k} {v}" for k, v in best.items())
             + f" (VI {vi:.3f}; {len(rows)} floods, {seconds:.0f} s)")
    self.watchdog.beat("after calibrating")

  def finish(self) -> dict:
    """The final record (every rank's fingerprint, what evals and checkpoints cost)."""
    fingerprints = self.rank_fingerprints()
    fingerprint = fingerprints[self.dist.rank]
    wall_s = time.perf_counter() - self.t_start
    final = {"final": True, "step": self.step, "params_fingerprint": fingerprint,
             "rank_fingerprints": fingerprints, "ranks": self.dist.size,
             "local_devices": self.dist.local_devices, "global_batch": self.global_batch,
             "wall_s": round(wall_s, 3), "run_wall_s": round(self.wall_s(), 3)}
    if self.target_vi > 0:
      reached = self.target or {}
      final.update({f"target_{k}": reached.get(k) for k in ("step", "examples", "wall_s")},
                   target_vi=self.target_vi)
    for action in self.actions:
      if action.name in ("eval", "checkpoint"):
        final[f"time_{action.name}_s"] = round(action.spent_s, 3)
        final[f"{action.name}_fraction"] = round(action.spent_s / max(wall_s, 1e-9), 4)
    self.writer.write(final)
    self.log(f"done: step {self.step}, params_fingerprint {fingerprint[:16]}..., results in "
             f"{self.workdir}")
    if len(set(fingerprints)) != 1:
      raise TrainingDiverged(f"ranks ended with different parameters: {fingerprints}")
    return final

  def wall_s(self) -> float:
    """The run's wall seconds since its step 0, over every launch (resumes included)."""
    return self.wall0 + time.perf_counter() - self.t_start

  def run_meta(self) -> dict:
    """What a checkpoint records besides the arrays: model geometry, normalization, the run
    (its wall time so far and the target record, carried over resumes)."""
    return {**model_meta(self.config), "ranks": self.dist.size,
            "global_batch": self.global_batch, "wall_s": round(self.wall_s(), 3),
            "target": self.target, "config": json.loads(self.config.to_json_best_effort())}

  def rank_fingerprints(self) -> list[str]:
    """Every rank's ``params_fingerprint``, in rank order, on every rank."""
    return self.dist.allgather(params_fingerprint(jax.device_get(self.state.params)))


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
