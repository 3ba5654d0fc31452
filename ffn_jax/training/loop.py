"""``train_and_evaluate(config, workdir)``: the training loop and all its side effects.

Resume order: the latest readable checkpoint in ``WORKDIR/checkpoints`` -> ``init_checkpoint``
(fine-tuning: its parameters, a fresh optimizer) -> fresh init; rank 0's parameters are
broadcast to all ranks (``ffn_jax.training.start``). The periodic work (logging, evaluation,
sync checks, checkpoints) is a list of ``periodic.PeriodicAction``s. Metrics go to ``WORKDIR/metrics.jsonl`` (rank 0 only); the
last line is a final record with the parameter fingerprint of every rank.

Failure handling: a checkpoint of a different model/optimizer/batch is refused before it is read
(exit 2, left untouched); an unreadable newest checkpoint is skipped and set aside. SIGTERM saves
a checkpoint and exits 75. A watchdog thread enforces two deadlines even while the main thread is
stuck in XLA or an MPI collective: ``preemption_grace_s`` after SIGTERM, and ``step_timeout_s``
without a finished step (a hung or dead rank); either ends every rank.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

import jax
import numpy as np

from ffn_jax import checkpoint as ckpt_lib
from ffn_jax import cli
from ffn_jax import losses, optim, parallel
from ffn_jax.errors import UserError
from ffn_jax.training import periodic, seg_eval
from ffn_jax.training.setup import (batch_per_device, build_examples, configured_step_timeout_s,
                                    validate_config)
from ffn_jax.training.start import (abstract_state, build_model, checkpoint_tree,
                                    compute_route, init_state, load_init_params, meta_checker,
                                    model_meta)
from ffn_jax.training.state import TrainState, params_fingerprint
from ffn_jax.training.writers import MetricWriter
from ffn_jax.training.watchdog import EXIT_PREEMPTED, Watchdog  # noqa: F401 - re-exported


class TrainingDiverged(Exception):
  """Loss became NaN/inf, or ranks no longer hold identical parameters."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved."""


def train_and_evaluate(config, workdir: str, optimizer=None) -> dict:
  """Trains to ``config.max_steps``, resuming from ``workdir``. Returns the final record.

  Args:
    optimizer: instead of ``config.optim.name``, any optax ``GradientTransformation``, or a
      function of the learning-rate schedule returning one (``config.optim``'s clipping is
      still applied first). Under MPI every rank applies it to the allreduced gradient.
  """
  validate_config(config)
  dist = parallel.init()
  prefix = f"[rank {dist.rank}] " if dist.size > 1 else ""
  watchdog = Watchdog(config.preemption_grace_s, configured_step_timeout_s(config), prefix)
  try:
    return _train(config, os.path.abspath(workdir), dist, watchdog, optimizer)
  finally:
    watchdog.close()


def _train(config, workdir: str, dist: parallel.Dist, watchdog: Watchdog, optimizer) -> dict:
  log = (lambda *a: print(*a, flush=True)) if dist.is_primary else (lambda *a: None)
  per_device = batch_per_device(config, dist)
  global_batch = per_device * dist.local_devices * dist.size
  if dist.is_primary:
    try:
      os.makedirs(workdir, exist_ok=True)
      probe = os.path.join(workdir, f".write_test_{os.getpid()}")
      with open(probe, "w"):
        pass
      os.remove(probe)
    except OSError as e:
      raise UserError(f"cannot write to workdir {workdir}: {e.strerror}") from None
  dist.barrier()

  route, compute_dtype, why = compute_route(config)
  log(f"compute: {compute_dtype} convolutions, route {route} ({why})")
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config.optim, global_batch, optimizer)
  evaluator = None
  if seg_eval.enabled(config):
    evaluator = seg_eval.SegmentationEval(
        config, dist, model_meta(config)["model"],
        heartbeat=lambda: watchdog.beat("while running the segmentation eval"))
  manager = ckpt_lib.make_manager(ckpt_lib.checkpoint_dir(workdir), config.keep_checkpoints,
                                  create=dist.is_primary)
  writer = MetricWriter(workdir, dist.is_primary, bool(config.get("tensorboard", True)))
  examples = None
  try:
    # Fine-tuning starts from init_checkpoint, unless this run has checkpoints of its own; its
    # geometry is checked before the (slow) training data is set up.
    init = (load_init_params(config, model)
            if config.get("init_checkpoint") and not manager.all_steps() else None)
    examples = build_examples(config, dist, workdir, log, per_device)
    step_fn = parallel.DistributedStep(dist, model, tx)

    def abstract():  # built only if a checkpoint's meta matches this config
      return checkpoint_tree(abstract_state(config, model, tx), [examples.state()] * dist.size)

    restored = ckpt_lib.restore_latest(manager, abstract, log=log,
                                       check_meta=meta_checker(config, dist, global_batch))
    steps = dist.allgather(None if restored is None else int(restored.step))
    if len(set(steps)) != 1:
      raise ckpt_lib.CheckpointError(
          f"ranks restored different checkpoint steps {steps} from {manager.directory}; is it "
          "on a file system that every rank sees the same way?")
    if restored is not None:
      tree = restored.state
      state = TrainState(**{k: tree["train"][k] for k in ("step", "params", "opt_state", "rng")}) \
          if isinstance(tree["train"], dict) else tree["train"]
      examples.restore({k: v[dist.rank] for k, v in tree["data"].items()})
      if restored.unreadable_steps and dist.is_primary:
        ckpt_lib.set_aside(manager, restored.unreadable_steps, log)
      dist.barrier()
      log(f"resumed from {manager.directory} at step {int(state.step)}")
    else:
      state = init_state(config, model, tx, dist, init)
      if init is not None:
        log(f"fine-tuning from {config.init_checkpoint} (fresh optimizer, step 0)")
    state = parallel.put_on_first_device(state, dist)
    return _loop(config, workdir, dist, watchdog, log, manager, writer, schedule, examples,
                 step_fn, evaluator, state, restored is not None, global_batch)
  finally:
    if examples is not None:
      examples.close()
    manager.close()
    writer.close()


def _loop(config, workdir, dist, watchdog, log, manager, writer, schedule, examples, step_fn,
          evaluator, state, resumed, global_batch) -> dict:
  step = int(state.step)
  acc, t_window, n_window = _zero_acc(), time.perf_counter(), 0
  t_start, step_start = time.perf_counter(), step
  last_saved = step if resumed else -1
  eval_s_in_window = 0.0  # excluded from the window's training throughput

  # -- the periodic actions (ffn_jax.training.periodic): each a function of the step ----------
  def log_window(at_step):
    nonlocal acc, t_window, n_window, eval_s_in_window
    now = time.perf_counter()
    record = _record(acc, n_window, at_step, float(schedule(at_step - 1)), global_batch,
                     now - t_window - eval_s_in_window, dist)
    writer.write(record)
    eta = (now - t_start) / max(at_step - step_start, 1) * (config.max_steps - at_step)
    log(f"step {at_step}/{config.max_steps} loss {record['loss']:.4f} "
        f"f1 {record['f1']:.3f} lr {record['learning_rate']:.2e} "
        f"{record['fovs_per_s']:.2f} FOV/s  ETA {_fmt_eta(eta)}")
    acc, t_window, n_window, eval_s_in_window = _zero_acc(), now, 0, 0.0

  def save(at_step, delay_s=0.0):
    nonlocal last_saved
    watchdog.beat(f"while saving the checkpoint of step {at_step}")
    gathered = dist.allgather(examples.state())
    if dist.is_primary:
      if delay_s:
        time.sleep(delay_s)  # tests only: a save slower than the preemption grace
      ckpt_lib.save(manager, at_step, checkpoint_tree(jax.device_get(state), gathered),
                    _run_meta(config, dist, global_batch))
    dist.barrier()
    watchdog.beat(f"after saving the checkpoint of step {at_step}")
    last_saved = at_step

  best = None
  if evaluator is not None and config.eval.keep_best and dist.is_primary:
    best = ckpt_lib.BestParams(ckpt_lib.best_dir(workdir), config.eval.get("best_metric", "vi"))

  def evaluate(at_step):
    nonlocal eval_s_in_window
    watchdog.beat(f"while evaluating at step {at_step}")
    params = jax.device_get(state.params)
    scores = evaluator(params)
    record = {"eval": True, "step": at_step, "examples": at_step * global_batch, **scores}
    eval_s_in_window += record["eval_s"]
    if best is not None:
      record["best"] = best.offer(at_step, params, record, _run_meta(config, dist, global_batch))
    writer.write(record)
    erl = "n/a" if record["erl"] is None else f"{record['erl']:.1f} of {record['erl_max']:.1f}"
    log(f"eval at step {at_step}: VI {record['vi']:.3f} (split {record['vi_split']:.3f}, merge "
        f"{record['vi_merge']:.3f}) ARE {record['are']:.3f}, ERL {erl} ({record['merges']} "
        f"merges, {record['splits']} splits), {record['segments']} segments, "
        f"{100 * record['fraction_labelled']:.0f}% labelled, {record['fov_calls']} FOVs, "
        f"{record['eval_s']:.1f} s" + (" (best so far)" if record.get("best") else ""))
    watchdog.beat(f"after evaluating at step {at_step}")

  actions = [
      periodic.PeriodicAction("log", log_window, every_steps=config.log_every, at_end=True),
      periodic.PeriodicAction("sync", lambda s: _check_sync(dist, state.params, s),
                              every_steps=config.sync_check_every),
      periodic.PeriodicAction("checkpoint", save, every_steps=config.checkpoint_every,
                              at_end=True),
  ]
  eval_action = None
  if evaluator is not None:
    eval_action = periodic.PeriodicAction(
        "eval", evaluate, every_steps=config.eval.every_steps, every_s=config.eval.every_s,
        at_end=True)
    actions.insert(1, eval_action)  # after logging the window, before sync check and save

  if step < config.max_steps and dist.agree([], watchdog.sigterm_at is not None)[1]:
    raise Preempted(f"SIGTERM before training started; nothing new to save (rerun the same "
                    f"command to continue from step {step})")
  if eval_action is not None and config.eval.at_start and step == 0 and not resumed:
    eval_action(0)  # the starting point: e.g. the pretrained model before fine-tuning
  watchdog.beat(f"in step {step + 1} (the first of this run compiles)")
  for action in actions:
    action.start()
  while step < config.max_steps:
    t_data = time.perf_counter()
    batch = examples.next_batch()
    t_data = time.perf_counter() - t_data
    if config.debug.perturb_at_step == step and config.debug.perturb_rank == dist.rank:
      state = state.replace(params=jax.tree_util.tree_map(lambda p: p * 1.001, state.params))
    state, stats, logits, times = step_fn(state, batch)
    if config.debug.nan_at_step == step:
      stats["loss"] = np.float32("nan")
    examples.update(logits)
    step += 1
    watchdog.beat(f"after step {step}")
    loss = float(stats["loss"])
    if not math.isfinite(loss):
      raise TrainingDiverged(
          f"loss is {loss} at step {step}; stopping. The last good checkpoint "
          f"(step {last_saved if last_saved >= 0 else 'none'}) is kept in "
          f"{manager.directory}")
    _accumulate(acc, stats, times, t_data)
    n_window += 1
    due, preempted = periodic.agreed_due(actions, dist, step, step == config.max_steps,
                                         watchdog.sigterm_at is not None)
    for action in due:
      action(step)
    if preempted:
      if last_saved != step:
        save(step, config.debug.get("preempt_save_delay_s", 0.0))
      raise Preempted(f"SIGTERM: saved checkpoint at step {step} in {manager.directory}; "
                      "rerun the same command to continue")
  if last_saved != step:
    save(step)

  fingerprints = _rank_fingerprints(dist, state.params)
  fingerprint = fingerprints[dist.rank]
  wall_s = time.perf_counter() - t_start
  final = {"final": True, "step": step, "params_fingerprint": fingerprint,
           "rank_fingerprints": fingerprints, "ranks": dist.size,
           "local_devices": dist.local_devices, "global_batch": global_batch,
           "wall_s": round(wall_s, 3)}
  for action in actions:
    if action.name in ("eval", "checkpoint"):
      final[f"time_{action.name}_s"] = round(action.spent_s, 3)
      final[f"{action.name}_fraction"] = round(action.spent_s / max(wall_s, 1e-9), 4)
  writer.write(final)
  log(f"done: step {step}, params_fingerprint {fingerprint[:16]}..., results in {workdir}")
  if len(set(fingerprints)) != 1:
    raise TrainingDiverged(f"ranks ended with different parameters: {fingerprints}")
  return final


def _run_meta(config, dist, global_batch) -> dict:
  """What a checkpoint records besides the arrays: model geometry, normalization, the run."""
  return {**model_meta(config), "ranks": dist.size, "global_batch": global_batch,
          "config": json.loads(config.to_json_best_effort())}


def _rank_fingerprints(dist, params) -> list[str]:
  """Every rank's ``params_fingerprint``, in rank order, on every rank."""
  return dist.allgather(params_fingerprint(jax.device_get(params)))


def _check_sync(dist, params, step) -> None:
  if dist.size == 1:
    return
  prints = _rank_fingerprints(dist, params)
  if len(set(prints)) != 1:
    bad = [r for r, p in enumerate(prints) if p != prints[0]]
    raise TrainingDiverged(f"ranks diverged at step {step}: parameters of rank(s) {bad} differ "
                           "from rank 0; aborting all ranks")


def _zero_acc() -> dict:
  return {"loss": 0.0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "time_step_s": 0.0,
          "time_allreduce_s": 0.0, "time_data_s": 0.0}


def _accumulate(acc, stats, times, t_data) -> None:
  for k in ("loss", "tp", "fp", "fn"):
    acc[k] += float(stats[k])
  acc["time_step_s"] += times["time_step_s"]
  acc["time_allreduce_s"] += times["time_allreduce_s"]
  acc["time_data_s"] += t_data


def _record(acc, n, step, lr, global_batch, elapsed, dist) -> dict:
  precision, recall, f1 = losses.precision_recall_f1(acc["tp"], acc["fp"], acc["fn"])
  return {"step": step, "loss": acc["loss"] / n, "learning_rate": lr,
          "precision": precision, "recall": recall, "f1": f1,
          "fovs_per_s": n * global_batch / elapsed, "ranks": dist.size,
          "local_devices": dist.local_devices, "global_batch": global_batch,
          "time_step_s": acc["time_step_s"] / n, "time_allreduce_s": acc["time_allreduce_s"] / n,
          "time_data_s": acc["time_data_s"] / n}


def _fmt_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def main(config, workdir: str) -> int:
  """Entry point body for train.py: returns the process exit code."""
  try:
    train_and_evaluate(config, workdir)
  except Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  except UserError:
    raise  # bad input, incl. a checkpoint of another config: one line, exit 2 (cli.clean_errors)
  except (TrainingDiverged, ckpt_lib.CheckpointError) as e:
    cli.fail(f"error: {e}", 1)
  except BaseException:
    # Any other failure on one rank must not leave the others blocked in an allreduce.
    if parallel.mpi_world() is not None:
      traceback.print_exc()
      parallel.abort_job(1)
    raise
  return 0
