"""Orbax checkpoints in ``WORKDIR/checkpoints``: train state (PyTree) + JSON metadata.

Layout of one checkpoint step: item ``state`` (params, opt_state, step, rng; StandardSave) and item
``meta`` (JSON: data-iterator state, model config, anything small). A checkpoint written with
``params`` only (e.g. an imported TensorFlow model) restores with ``load_params``.

Resume order (as in big_vision): own workdir's latest complete checkpoint -> fresh init.
A checkpoint that fails to restore (corrupt, truncated) is reported and the previous one tried.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(Exception):
  """A checkpoint cannot be used (missing, corrupt, or from a different model)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(directory: str, max_to_keep: int | None = 3, create: bool = True):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager, step: int, state: Any, meta: dict) -> None:
  """Writes one checkpoint (blocking). Orbax writes to a temp dir and renames when complete."""
  state = jax.device_get(state)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()


def restore_latest(manager, abstract_state: Any, log=print):
  """Restores the newest checkpoint that loads; returns (step, state, meta) or None.

  Args:
    abstract_state: a PyTree with the expected structure/shapes (arrays or ShapeDtypeStructs).
  Raises:
    CheckpointError: a checkpoint loaded but does not match ``abstract_state`` (different model).
  """
  abstract_state = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
      if not isinstance(x, jax.ShapeDtypeStruct) else x, abstract_state)
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      if _is_shape_mismatch(e):
        raise CheckpointError(
            f"checkpoint step {step} in {manager.directory} does not match this model/optimizer "
            f"config ({_first_line(e)}); use another --workdir or the config it was trained with")
      log(f"warning: checkpoint step {step} is unreadable ({_first_line(e)}); "
          "falling back to the previous one")
      continue
    except Exception as e:  # noqa: BLE001 - any failure to read a step means try the previous one
      log(f"warning: checkpoint step {step} is unreadable ({type(e).__name__}: {_first_line(e)}); "
          "falling back to the previous one")
      continue
    _check_shapes(abstract_state, restored.state, step)
    return step, restored.state, dict(restored.meta)
  if steps:
    raise CheckpointError(f"no readable checkpoint in {manager.directory} (tried steps {steps})")
  return None


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else type(e).__name__


def _is_shape_mismatch(e: Exception) -> bool:
  text = str(e).lower()
  return "shape" in text and ("mismatch" in text or "expected" in text or "does not match" in text)


def _check_shapes(expected, got, step) -> None:
  exp_leaves, exp_def = jax.tree_util.tree_flatten(expected)
  got_leaves, got_def = jax.tree_util.tree_flatten(got)
  if exp_def != got_def:
    raise CheckpointError(
        f"checkpoint step {step} has a different structure than this model/optimizer config; "
        "use another --workdir or the config it was trained with")
  for e, g in zip(exp_leaves, got_leaves):
    if tuple(np.shape(e)) != tuple(np.shape(g)):
      raise CheckpointError(
          f"checkpoint step {step} holds an array of shape {tuple(np.shape(g))} where this model "
          f"expects {tuple(np.shape(e))}; use another --workdir or the config it was trained with")


def save_params(directory: str, params: Any, step: int = 0, meta: dict | None = None) -> None:
  """Writes a params-only checkpoint (e.g. an imported model) that ``load_params`` reads."""
  manager = make_manager(directory, max_to_keep=None)
  save(manager, step, {"params": params}, meta or {})
  manager.close()


def load_params(directory: str, step: int | None = None):
  """Loads ``params`` from a training workdir, its ``checkpoints`` folder, or a params checkpoint.

  Returns:
    (params as a nested dict of numpy arrays, meta dict).
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory not found: {directory}")
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  manager = make_manager(directory, max_to_keep=None, create=False)
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    steps = [step] if step in steps else []
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory}")
  for s in steps:
    try:
      restored = manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      print(f"warning: checkpoint step {s} is unreadable ({_first_line(e)}); "
            "falling back to the previous one", file=sys.stderr)
      continue
    params = jax.tree_util.tree_map(np.asarray, restored.state["params"])
    return params, dict(restored.meta or {})
  raise CheckpointError(f"no readable checkpoint in {directory} (tried steps {steps})")
