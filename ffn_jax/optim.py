"""Optax optimizer and learning-rate schedule from config, with large-batch LR scaling.

``learning_rate`` is the base rate at ``reference_batch`` global examples; ``lr_scaling`` rescales
it to the actual global batch: ``none``; ``linear`` (x batch / ref, Goyal et al.); ``sqrt``
(x sqrt(batch / ref)). The paper (Dong et al., SC19) found linear + warmup best up to ~16 nodes
and sqrt beyond. Warmup ramps linearly from ``warmup_init_fraction * lr`` to ``lr`` over
``warmup_steps``; then the schedule (constant, cosine, exponential, step) runs from there.
"""
from __future__ import annotations

import math

import optax

from ffn_jax.errors import UserError

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb", "lars")
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


def make_optimizer(cfg, global_batch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optax transformation incl. clipping, schedule) for config ``cfg`` (config.optim)."""
  schedule = make_schedule(cfg, global_batch)
  name = cfg.name
  if name == "sgd":
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
