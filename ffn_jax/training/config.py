"""A training config, checked before anything slow runs, and the batch it implies per device.

Every field whose wrong value would fail later with a traceback (a wrong type, a zero, a wrong
length) is refused here with a one-line ``UserError`` naming it. The run then takes its data
(``data.py``), then its state and checkpoints (``state.py``), in that order.
"""
from __future__ import annotations

from ffn_jax import parallel
from ffn_jax.checkpoint import BEST_METRICS
from ffn_jax.errors import UserError
from ffn_jax.skeleton_metrics import DEFAULT_MIN_NODES


def validate_config(config) -> None:
  """Refuses values that would fail later with a traceback (wrong type, zero, wrong length).

  Raises:
    UserError: naming the field, what it needs, and what it got.
  """
  def need(ok, name, what, value):
    if not ok:
      raise UserError(f"config.{name} must be {what}, got {value!r}")

  def integer(v):
    return isinstance(v, int) and not isinstance(v, bool)

  def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)

  def zyx(name, value, minimum, allow_empty=False):
    if allow_empty and isinstance(value, (tuple, list)) and not value:
      return
    ok = (isinstance(value, (tuple, list)) and len(value) == 3
          and all(integer(v) and v >= minimum for v in value))
    need(ok, name, f"3 integers >= {minimum} (z, y, x)" + (" or ()" if allow_empty else ""),
         value)

  for name, minimum in (("batch_size", 1), ("max_steps", 0), ("log_every", 1),
                        ("checkpoint_every", 1), ("keep_checkpoints", 1), ("sync_check_every", 0),
                        ("model.depth", 1), ("model.features", 1), ("data.fov_moves", 0),
                        ("data.min_size", 0)):
    section, _, field = name.rpartition(".")
    value = (config[section] if section else config)[field]
    need(integer(value) and value >= minimum, name, f"an integer >= {minimum}", value)
  need(integer(configured_global_batch(config)) and configured_global_batch(config) >= 0, "global_batch",
       "an integer >= 0 (0 = batch_size per device)", configured_global_batch(config))
  prefetch = config.data.get("prefetch_examples", 0)
  need(integer(prefetch) and prefetch >= -1, "data.prefetch_examples",
       "an integer >= -1 (-1 = auto, 0 = off)", prefetch)
  need(number(config.preemption_grace_s) and config.preemption_grace_s > 0,
       "preemption_grace_s", "a number of seconds > 0", config.preemption_grace_s)
  need(number(configured_step_timeout_s(config)) and configured_step_timeout_s(config) >= 0,
       "step_timeout_s", "a number of seconds >= 0 (0 = off)", configured_step_timeout_s(config))
  ema = config.optim.get("ema_decay", 0.0)
  need(number(ema) and 0 <= ema < 1, "optim.ema_decay", "a number in [0, 1) (0 = off)", ema)
  need(number(config.data.image_stddev) and config.data.image_stddev > 0,
       "data.image_stddev", "a number > 0", config.data.image_stddev)
  from ffn_jax.model import KERNEL_INITS  # local: keeps flax out of config validation's imports
  kernel_init = config.model.get("kernel_init", "glorot_uniform")
  need(kernel_init in KERNEL_INITS, "model.kernel_init", f"one of {sorted(KERNEL_INITS)}",
       kernel_init)
  zyx("model.fov_size_zyx", config.model.fov_size_zyx, 1)
  zyx("model.deltas_zyx", config.model.deltas_zyx, 0)
  zyx("data.lom_radius_zyx", config.data.lom_radius_zyx, 0)
  zyx("data.box_start_zyx", config.data.box_start_zyx, 0)
  zyx("data.box_size_zyx", config.data.box_size_zyx, 1, allow_empty=True)
  zyx("data.synthetic_shape_zyx", config.data.synthetic_shape_zyx, 1)
  e = config.get("eval")
  if e is not None:
    need(integer(e.every_steps) and e.every_steps >= 0, "eval.every_steps",
         "an integer >= 0 (0 = not by steps)", e.every_steps)
    need(number(e.every_s) and e.every_s >= 0, "eval.every_s", "a number of seconds >= 0",
         e.every_s)
    need(integer(e.batch_size) and e.batch_size >= 1, "eval.batch_size", "an integer >= 1",
         e.batch_size)
    zyx("eval.box_start_zyx", e.box_start_zyx, 0)
    zyx("eval.box_size_zyx", e.box_size_zyx, 1, allow_empty=True)
    target = e.get("target_vi", 0.0)
    need(number(target) and target >= 0, "eval.target_vi", "a VI >= 0 (0 = no target)", target)
    need(e.get("best_metric", "vi") in BEST_METRICS, "eval.best_metric",
         f"one of {sorted(BEST_METRICS)}", e.get("best_metric", "vi"))
    min_nodes = e.get("skeleton_min_nodes", DEFAULT_MIN_NODES)
    need(integer(min_nodes) and min_nodes >= 1, "eval.skeleton_min_nodes", "an integer >= 1",
         min_nodes)
    voxel_size = e.get("voxel_size_zyx", (1.0, 1.0, 1.0))
    need(isinstance(voxel_size, (tuple, list)) and len(voxel_size) == 3
         and all(number(v) and v > 0 for v in voxel_size), "eval.voxel_size_zyx",
         "3 numbers > 0 (z, y, x)", voxel_size)


# Fields added after the first configs were written: configs of one's own may lack them.
def configured_global_batch(config) -> int:
  return config.get("global_batch", 0)


def configured_step_timeout_s(config) -> float:
  return config.get("step_timeout_s", 0.0)


def batch_per_device(config, dist: parallel.Dist) -> int:
  """Examples per local device: ``batch_size``, or ``global_batch`` split over every device.

  Raises:
    UserError: ``global_batch`` does not divide evenly over ranks x local devices.
  """
  replicas = dist.size * dist.local_devices
  global_batch = configured_global_batch(config)
  if global_batch <= 0:
    return config.batch_size
  if global_batch % replicas:
    raise UserError(
        f"global_batch={global_batch} cannot be split evenly over {dist.size} rank(s) x "
        f"{dist.local_devices} local device(s) = {replicas}; use a multiple of {replicas} or "
        "another rank count")
  return global_batch // replicas
