"""Optax optimizer and learning-rate schedule from config, with large-batch LR scaling.

``learning_rate`` is the base rate at ``reference_batch`` global examples; ``lr_scaling`` rescales
it to the actual global batch: ``none``; ``linear`` (x batch / ref, Goyal et al.); ``sqrt``
(x sqrt(batch / ref)). The paper (Dong et al., SC19) found linear + warmup best up to ~16 nodes
and sqrt beyond. Warmup ramps linearly from ``warmup_init_fraction * lr`` to ``lr`` over
``warmup_steps``; then the schedule (constant, cosine, exponential, step) runs from there.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Union

import optax

from ffn_jax.errors import UserError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb", "lars", "custom")
# A GradientTransformation, or a function of the learning-rate schedule returning one.
CustomOptimizer = Union[optax.GradientTransformation, Callable[[optax.Schedule],
                                                                 optax.GradientTransformation]]
SCHEDULES = ("constant", "cosine", "exponential", "step")
SCALINGS = ("none", "linear", "sqrt")


def scaled_learning_rate(base_lr: float, global_batch: int, reference_batch: int,
                         rule: str) -> float:
  if rule not in SCALINGS:
    raise UserError(f"unknown optim.lr_scaling {rule!r}; choose one of {SCALINGS}")
  if reference_batch <= 0:
    raise UserError(f"optim.reference_batch must be positive, got {reference_batch}")
  ratio = global_batch / reference_batch
  return base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def make_schedule(cfg, global_batch: int) -> optax.Schedule:
  """The learning rate per step (after warmup and scaling)."""
  lr = scaled_learning_rate(cfg.learning_rate, global_batch, cfg.reference_batch, cfg.lr_scaling)
  warmup = int(cfg.warmup_steps)
  decay_steps = max(int(cfg.decay_steps), 1)
  name = cfg.schedule
  if name == "constant":
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.final_lr_fraction)
  elif name == "exponential":
    main = optax.exponential_decay(lr, decay_steps, cfg.decay_rate, staircase=False)
  elif name == "step":
    boundaries = {int(b): float(cfg.decay_rate) for b in cfg.step_boundaries}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  else:
    raise UserError(f"unknown optim.schedule {name!r}; choose one of {SCHEDULES}")
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(lr * cfg.warmup_init_fraction, lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def load_factory(spec: str) -> Callable:
  """``"package.module:function"`` -> the function (config entries name optimizer factories)."""
  module_name, _, attr = spec.partition(":")
  if not module_name or not attr:
    raise UserError(f"optim.factory must look like 'module:function', got {spec!r}")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f"optim.factory {spec!r}: cannot import {module_name} ({e})") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise UserError(f"optim.factory {spec!r}: {module_name} has no function {attr!r}")
  return fn


def _custom(custom: CustomOptimizer, schedule, what: str) -> optax.GradientTransformation:
  tx = custom
  if not isinstance(tx, optax.GradientTransformation):
    try:
      tx = custom(schedule)
    except TypeError as e:
      raise UserError(f"{what} cannot be called with the learning-rate schedule ({e})") from None
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    raise UserError(f"{what} returned {type(tx).__name__}, not an optax GradientTransformation")
  return tx


def make_optimizer(cfg, global_batch: int, custom: CustomOptimizer | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation incl. clipping, schedule) for config ``cfg`` (config.optim).

  Args:
    custom: used instead of ``cfg.name`` (``train_and_evaluate(..., optimizer=tx)``); a
      transformation, or a function of the schedule returning one.
  """
  schedule = make_schedule(cfg, global_batch)
  name = cfg.name
  factory = cfg.get("factory", "")
  if factory and name != "custom":
    raise UserError(f"optim.factory is used with optim.name=custom only (got optim.name={name!r})")
  if custom is not None:
    opt = _custom(custom, schedule, "the optimizer passed to train_and_evaluate")
  elif name == "custom":
    if not factory:
      raise UserError("optim.name=custom needs optim.factory='module:function' (a function of "
                      "the learning-rate schedule returning an optax GradientTransformation)")
    opt = _custom(load_factory(factory), schedule, f"optim.factory {factory!r}")
  elif name == "sgd":
    opt = optax.sgd(schedule)
  elif name == "momentum":
    opt = optax.sgd(schedule, momentum=cfg.momentum)
  elif name == "nesterov":
    opt = optax.sgd(schedule, momentum=cfg.momentum, nesterov=True)
  elif name == "adam":
    opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif name == "adamw":
    opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif name == "lamb":
    opt = optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif name == "lars":
    opt = optax.lars(schedule, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
  else:
    raise UserError(f"unknown optim.name {name!r}; choose one of {OPTIMIZERS}")
  chain = []
  if cfg.clip_value > 0:  # Google FFN's element-wise clipping (0.7 in its FIB-25 training)
    chain.append(optax.clip(cfg.clip_value))
  if cfg.clip_global_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.clip_global_norm))
  return optax.chain(*chain, opt), schedule
