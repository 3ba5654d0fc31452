"""Orbax checkpoints in ``WORKDIR/checkpoints``: train state (PyTree) + JSON metadata.

Layout of one checkpoint step: item ``state`` (params, opt_state, step, rng; StandardSave) and item
``meta`` (JSON: data-iterator state, model config, anything small). A checkpoint written with
``params`` only (e.g. an imported TensorFlow model) restores with ``load_params``.

Resume order (as in big_vision): own workdir's latest complete checkpoint -> fresh init.
A checkpoint that fails to restore (corrupt, truncated) is reported and the previous one tried;
the trainer then moves it to ``WORKDIR/unreadable_checkpoints/`` so the step can be written again.

Crash safety: orbax writes each step into ``<step>.orbax-checkpoint-tmp-<time>`` and renames it to
``<step>`` only when complete, so a kill during a save leaves a temp folder that is never listed
as a step (and is removed the next time the manager is created for writing).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from ffn_jax.errors import UserError

UNREADABLE_DIR = "unreadable_checkpoints"
BEST_DIR = "best"  # WORKDIR/best: the params with the best segmentation eval score so far
CHECKPOINT_KINDS = ("latest", "best")
# Eval scores that can pick WORKDIR/best (config.eval.best_metric), and whether higher is better.
BEST_METRICS = {"vi": False, "erl": True}


class CheckpointError(Exception):
  """A checkpoint cannot be used (missing, corrupt, or from a different model)."""


class CheckpointMismatch(CheckpointError, UserError):
  """The checkpoint is fine but was trained with another model/optimizer/batch config."""


class Restored(NamedTuple):
  step: int
  state: Any
  meta: dict
  unreadable_steps: list  # newer steps that failed to load and were skipped


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(directory: str, max_to_keep: int | None = 3, create: bool = True):
  """An orbax manager; ``create`` (the one process that writes) also removes leftover temp dirs."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False,
      cleanup_tmp_directories=create)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager, step: int, state: Any, meta: dict) -> None:
  """Writes one checkpoint (blocking). Orbax writes to a temp dir and renames when complete.

  Raises:
    CheckpointError: orbax skipped the save (it silently refuses a step <= the latest one).
  """
  state = jax.device_get(state)
  saved = manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  if not saved:
    raise CheckpointError(f"checkpoint step {step} was not written to {manager.directory} "
                          f"(it already holds step {manager.latest_step()})")


def restore_latest(manager, abstract_state: Any, log=print,
                   check_meta: Callable[[int, dict], None] | None = None) -> Restored | None:
  """Restores the newest checkpoint that loads; returns a ``Restored`` or None if there is none.

  For each step, newest first: read its JSON meta, let ``check_meta(step, meta)`` refuse a
  checkpoint of another config (by raising), then read the state. A step whose files cannot be
  read is reported through ``log`` and the previous step tried.

  Args:
    abstract_state: a PyTree with the expected structure/shapes (arrays or ShapeDtypeStructs),
      or a function returning it, called only once a checkpoint's meta has passed the check.
    check_meta: raises ``CheckpointMismatch`` when the meta shows a different model/config.
  Raises:
    CheckpointMismatch: a checkpoint loaded but does not match this model (different config).
    CheckpointError: there are checkpoints and none of them can be read.
  """
  _quiet_closed_loop_noise()
  steps = sorted(manager.all_steps(), reverse=True)
  unreadable = []
  for step in steps:
    try:
      meta = dict(manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta or {})
    except Exception as e:  # noqa: BLE001 - any failure to read a step means try the previous one
      _warn_unreadable(log, step, e)
      unreadable.append(step)
      continue
    if check_meta is not None:
      check_meta(step, meta)
    if callable(abstract_state):
      abstract_state = abstract_state()
    abstract_state = jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), abstract_state)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:
      if _is_shape_mismatch(e):
        raise CheckpointMismatch(
            f"checkpoint step {step} in {manager.directory} does not match this model/optimizer "
            f"config ({_first_line(e)}); use another --workdir or the config it was trained with")
      _warn_unreadable(log, step, e)
      unreadable.append(step)
      continue
    except Exception as e:  # noqa: BLE001
      _warn_unreadable(log, step, e)
      unreadable.append(step)
      continue
    _check_shapes(abstract_state, restored.state, step)
    return Restored(step, restored.state, meta, unreadable)
  if steps:
    raise CheckpointError(
        f"no readable checkpoint in {manager.directory} (tried steps {steps}); move it away "
        "to start from scratch, or use another --workdir")
  return None


def set_aside(manager, steps, log=print) -> None:
  """Moves unreadable checkpoint steps out of the manager's folder (kept for inspection).

  Needed before training continues from an older step: orbax refuses to write a step at or
  below the latest one it lists, so a corrupt newest step would block every later save.
  """
  target_root = os.path.join(os.path.dirname(str(manager.directory)), UNREADABLE_DIR)
  for step in steps:
    source = os.path.join(str(manager.directory), str(step))
    if not os.path.exists(source):
      continue
    os.makedirs(target_root, exist_ok=True)
    target, n = os.path.join(target_root, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(target_root, f"{step}.{n}"), n + 1
    os.replace(source, target)
    log(f"moved unreadable checkpoint step {step} to {target}")
  manager.reload()


def _warn_unreadable(log, step, e: Exception) -> None:
  log(f"warning: checkpoint step {step} is unreadable ({type(e).__name__}: {_first_line(e)}); "
      "falling back to the previous one")


_hook_installed = False


def _drop_unretrieved_task_errors(record: logging.LogRecord) -> bool:
  return not str(record.msg).partition("\n")[0].endswith("exception was never retrieved")


def _quiet_closed_loop_noise() -> None:
  """Hides tensorstore's late "Event loop is closed" callbacks after a failed restore.

  When one read of a checkpoint fails, orbax closes its asyncio loop while other reads are still
  in flight; their completion callbacks then raise RuntimeError in tensorstore threads, which
  Python prints as dozens of tracebacks (through ``sys.unraisablehook``). The sibling reads that
  failed too are garbage-collected unawaited and asyncio logs them ("Task exception was never
  retrieved"). Both are harmless: the failure was already reported once.
  """
  global _hook_installed
  if _hook_installed:
    return
  logging.getLogger("asyncio").addFilter(_drop_unretrieved_task_errors)
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook
  _hook_installed = True


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else type(e).__name__


def _is_shape_mismatch(e: Exception) -> bool:
  text = str(e).lower()
  return "shape" in text and ("mismatch" in text or "expected" in text or "does not match" in text)


def check_same_shapes(expected, got) -> None:
  """Raises CheckpointMismatch unless ``got`` has ``expected``'s tree structure and shapes."""
  exp_leaves, exp_def = jax.tree_util.tree_flatten(expected)
  got_leaves, got_def = jax.tree_util.tree_flatten(got)
  if exp_def != got_def:
    raise CheckpointMismatch("its arrays have a different structure than this model/optimizer "
                             "config's")
  for e, g in zip(exp_leaves, got_leaves):
    if tuple(np.shape(e)) != tuple(np.shape(g)):
      raise CheckpointMismatch(f"it holds an array of shape {tuple(np.shape(g))} where this "
                               f"model expects {tuple(np.shape(e))}")


def _check_shapes(expected, got, step) -> None:
  try:
    check_same_shapes(expected, got)
  except CheckpointMismatch as e:
    raise CheckpointMismatch(f"checkpoint step {step}: {e}; use another --workdir or the config "
                             "it was trained with") from None


class BestParams:
  """``WORKDIR/best``: the parameters with the best segmentation eval score so far, one step kept.

  The score is the eval record's ``metric``: "vi" (lowest wins) or "erl" (highest wins; see
  ``BEST_METRICS``). Params-only (``load_params(workdir, kind="best")`` and ``infer.py
  --config.checkpoint_kind=best`` read it); its meta holds the eval record. On a resumed run the
  score to beat is read back from there.
  """

  def __init__(self, directory: str, metric: str = "vi"):
    if metric not in BEST_METRICS:
      raise UserError(f"best metric must be one of {sorted(BEST_METRICS)}, got {metric!r}")
    self.metric = metric
    self.higher_is_better = BEST_METRICS[metric]
    self.manager = make_manager(directory, max_to_keep=1, create=True)
    self.score = None
    step = self.manager.latest_step()
    if step is not None:
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        self.score = (meta.meta or {}).get("eval", {}).get(metric)
      except Exception:  # noqa: BLE001 - an unreadable best checkpoint is simply replaced
        self.score = None

  def offer(self, step: int, params: Any, record: dict, meta: dict) -> bool:
    """Saves ``params`` if ``record[metric]`` beats the best so far; returns whether it did. A
    record without the score (None: e.g. no skeleton to measure ERL on) never wins."""
    value = record.get(self.metric)
    if value is None or not np.isfinite(value):
      return False
    if self.score is not None and not (value > self.score if self.higher_is_better
                                       else value < self.score):
      return False
    for old in self.manager.all_steps():
      if old >= step:  # orbax only writes steps above the latest one
        self.manager.delete(old)
    save(self.manager, step, {"params": params}, {**meta, "eval": record})
    self.score = float(value)
    return True


def save_params(directory: str, params: Any, step: int = 0, meta: dict | None = None) -> None:
  """Writes a params-only checkpoint (e.g. an imported model) that ``load_params`` reads."""
  manager = make_manager(directory, max_to_keep=None)
  save(manager, step, {"params": params}, meta or {})
  manager.close()


def best_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), BEST_DIR)


def load_params(directory: str, step: int | None = None, kind: str = "latest",
                ema: bool = True):
  """Loads ``params`` from a training workdir, its ``checkpoints`` folder, or a params checkpoint.

  Args:
    kind: of a training workdir, its newest rolling checkpoint ("latest") or the one with the
      best segmentation eval score ("best", in ``WORKDIR/best``; VI or ERL, as
      ``eval.best_metric`` chose).
    ema: of a training checkpoint that keeps a moving average of the parameters
      (``optim.ema_decay``), the average (what evaluation and inference use) rather than the
      raw parameters.
  Returns:
    (params as a nested dict of numpy arrays, meta dict with ``checkpoint_step`` added: the
    step read).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory not found: {directory}")
  if kind == "best":
    if not os.path.isdir(best_dir(directory)):
      raise CheckpointError(f"no best checkpoint in {directory}: it is written by training runs "
                            "that have config.eval enabled")
    directory = best_dir(directory)
  elif kind != "latest":
    raise CheckpointError(f"unknown checkpoint kind {kind!r}; choose one of {CHECKPOINT_KINDS}")
  elif os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  manager = make_manager(directory, max_to_keep=None, create=False)
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    steps = [step] if step in steps else []
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory}")
  _quiet_closed_loop_noise()
  for s in steps:
    try:
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      print(f"warning: checkpoint step {s} is unreadable ({_first_line(e)}); "
            "falling back to the previous one", file=sys.stderr)
      continue
    tree = restored.state
    # A params-only checkpoint (imported model) or a training checkpoint {"train": state, ...}.
    params = tree["params"] if "params" in tree else (
        (ema and tree["train"].get("ema_params")) or tree["train"]["params"])
    params = jax.tree_util.tree_map(np.asarray, params)
    return params, {**dict(restored.meta or {}), "checkpoint_step": int(s)}
  raise CheckpointError(f"no readable checkpoint in {directory} (tried steps {steps})")
