"""``train_and_evaluate(config, workdir)``: a training run, set up in the order it takes
(config, data, state/checkpoint), then the loop.

Setup: the config is checked (``config.py``); the training volumes and this rank's examples are
built (``data.py``); the state is the latest readable checkpoint in ``WORKDIR/checkpoints`` ->
``init_checkpoint`` (fine-tuning: its parameters, a fresh optimizer) -> a fresh init, rank 0's
parameters on every rank (``state.py``). The run's state and periodic work (logging,
evaluation, sync checks, checkpoints) then live in one ``trainer.Trainer``, and ``_loop``
steps it. Metrics go to ``WORKDIR/metrics.jsonl`` (rank 0 only); the last line is a final
record with the parameter fingerprint of every rank.

Failure handling: a checkpoint of a different model/optimizer/batch is refused before it is read
(exit 2, left untouched); an unreadable newest checkpoint is skipped and set aside. SIGTERM saves
a checkpoint and exits 75. A watchdog thread enforces two deadlines even while the main thread is
stuck in XLA or an MPI collective: ``preemption_grace_s`` after SIGTERM, and ``step_timeout_s``
without a finished step (a hung or dead rank); either ends every rank.
"""
from __future__ import annotations

import os
import sys
import traceback

from ffn_jax import checkpoint as ckpt_lib
from ffn_jax import cli, optim, parallel
from ffn_jax import log as log_lib
from ffn_jax.errors import UserError
from ffn_jax.training import distributed, seg_eval
from ffn_jax.training.config import batch_per_device, configured_step_timeout_s, validate_config
from ffn_jax.training.data import build_examples
from ffn_jax.training.state import (TrainState, abstract_state, build_model, checkpoint_tree,
                                    compute_route, ema_decay, init_state, load_init_params,
                                    meta_checker, model_meta)
from ffn_jax.training.trainer import Trainer, TrainingDiverged  # noqa: F401 - re-exported
from ffn_jax.training.watchdog import EXIT_PREEMPTED, Watchdog  # noqa: F401 - re-exported
from ffn_jax.training.writers import MetricWriter


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved."""


def train_and_evaluate(config, workdir: str, optimizer=None) -> dict:
  """Trains to ``config.max_steps``, resuming from ``workdir``. Returns the final record.

  Args:
    optimizer: instead of ``config.optim.name``, any optax ``GradientTransformation``, or a
      function of the learning-rate schedule returning one (``config.optim``'s clipping is
      still applied first). Under MPI every rank applies it to the allreduced gradient.
  """
  validate_config(config)  # 1. the config
  dist = parallel.init()
  prefix = f"[rank {dist.rank}] " if dist.size > 1 else ""
  watchdog = Watchdog(config.preemption_grace_s, configured_step_timeout_s(config), prefix)
  try:
    return _train(config, os.path.abspath(workdir), dist, watchdog, optimizer)
  finally:
    watchdog.close()


def _train(config, workdir: str, dist: parallel.Dist, watchdog: Watchdog, optimizer) -> dict:
  log = log_lib.logger(active=dist.is_primary)
  per_device = batch_per_device(config, dist)
  global_batch = per_device * dist.local_devices * dist.size
  _check_writable(workdir, dist)
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
    examples = build_examples(config, dist, workdir, log, per_device)  # 2. the data
    state, meta = _restore_or_init(config, dist, manager, model, tx, examples, init,  # 3.
                                   global_batch, log)
    trainer = Trainer(config, workdir, dist, parallel.put_on_first_device(state, dist),
                      distributed.DistributedStep(dist, model, tx, ema_decay(config)), examples,
                      manager, writer, watchdog, log, schedule, evaluator, meta is not None,
                      global_batch, meta)
    return _loop(trainer, config.max_steps, config.debug.get("preempt_save_delay_s", 0.0))
  finally:
    if examples is not None:
      examples.close()
    manager.close()
    writer.close()


def _loop(trainer: Trainer, max_steps: int, save_delay_s: float = 0.0) -> dict:
  """Steps to ``max_steps``: each step, then the periodic actions all ranks agree are due;
  SIGTERM saves and stops. Returns the final record."""
  if trainer.step < max_steps and trainer.sigterm_agreed():
    raise Preempted(f"SIGTERM before training started; nothing new to save (rerun the same "
                    f"command to continue from step {trainer.step})")
  trainer.start()
  while trainer.step < max_steps:
    trainer.train_step()
    due, preempted = trainer.due_actions()
    for action in due:
      action(trainer.step)
    if preempted:
      if trainer.last_saved != trainer.step:
        trainer.save(trainer.step, save_delay_s)
      raise Preempted(f"SIGTERM: saved checkpoint at step {trainer.step} in "
                      f"{trainer.manager.directory}; rerun the same command to continue")
  if trainer.last_saved != trainer.step:
    trainer.save(trainer.step)
  if trainer.evaluator is not None and trainer.config.eval.get("calibrate", False):
    trainer.calibrate()
  return trainer.finish()


def _check_writable(workdir: str, dist: parallel.Dist) -> None:
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


def _restore_or_init(config, dist, manager, model, tx, examples, init, global_batch, log):
  """(state, the restored checkpoint's meta or None): the run's latest readable checkpoint
  (examples restored too), else ``init`` (fine-tuning) or a fresh init; rank 0's parameters on
  every rank."""
  def abstract():  # built only if a checkpoint's meta matches this config
    return checkpoint_tree(abstract_state(config, model, tx), [examples.state()] * dist.size)

  restored = ckpt_lib.restore_latest(manager, abstract, log=log,
                                     check_meta=meta_checker(config, dist, global_batch))
  steps = dist.allgather(None if restored is None else int(restored.step))
  if len(set(steps)) != 1:
    raise ckpt_lib.CheckpointError(
        f"ranks restored different checkpoint steps {steps} from {manager.directory}; is it "
        "on a file system that every rank sees the same way?")
  if restored is None:
    state = init_state(config, model, tx, dist, init)
    if init is not None:
      log(f"fine-tuning from {config.init_checkpoint} (fresh optimizer, step 0)")
    return state, None
  tree = restored.state
  state = TrainState(**{k: tree["train"][k] for k in ("step", "params", "opt_state", "rng",
                                                       "ema_params") if k in tree["train"]}) \
      if isinstance(tree["train"], dict) else tree["train"]
  examples.restore({k: v[dist.rank] for k, v in tree["data"].items()})
  if restored.unreadable_steps and dist.is_primary:
    ckpt_lib.set_aside(manager, restored.unreadable_steps, log)
  dist.barrier()
  log(f"resumed from {manager.directory} at step {int(state.step)}")
  return state, dict(restored.meta or {})


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
