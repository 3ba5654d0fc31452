"""Turning a config into what the training loop needs: validated fields, the per-device batch,
the training volumes and the recurrent example pipeline of this rank."""
from __future__ import annotations

import os

import jax
import numpy as np

from ffn_jax import parallel
from ffn_jax.checkpoint import BEST_METRICS
from ffn_jax.data import partitions, synthetic
from ffn_jax.data.examples import RecurrentExamples
from ffn_jax.data.volumes import open_volume
from ffn_jax.errors import UserError
from ffn_jax.skeleton_metrics import DEFAULT_MIN_NODES


# -- config --------------------------------------------------------------------------------------
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


# -- data ----------------------------------------------------------------------------------------
def read_labelled_box(image_spec, labels_spec, box_start_zyx, box_size_zyx, section: str):
  """(image, labels) of one box of an image/labels volume pair, validated.

  Args:
    section: the config section the values come from ("data", "eval"), for error messages.
  """
  if not image_spec or not labels_spec:
    raise UserError(f"set both {section}.image and {section}.labels (or neither, for synthetic "
                    "data)")
  image_vol, label_vol = open_volume(image_spec), open_volume(labels_spec)
  if image_vol.shape != label_vol.shape:
    raise UserError(f"image {image_vol.name} has shape {image_vol.shape} but labels "
                    f"{label_vol.name} have shape {label_vol.shape} (zyx)")
  if label_vol.dtype.kind not in "iu":
    raise UserError(f"labels {label_vol.name} have dtype {label_vol.dtype}; "
                    "labels must be integer object IDs")
  shape = np.asarray(image_vol.shape)
  start = np.asarray(box_start_zyx, int)
  if np.any(start >= shape):
    raise UserError(f"{section}.box_start_zyx {tuple(box_start_zyx)} lies outside the volumes "
                    f"of shape {tuple(shape.tolist())} (zyx)")
  size = np.asarray(box_size_zyx, int) if len(box_size_zyx) else shape - start
  size = np.minimum(size, shape - start)
  return image_vol.read(start, size), label_vol.read(start, size)


def load_training_volumes(config):
  """(float32 normalized image, labels) of the training region, validated."""
  d = config.data
  if not d.image and not d.labels:
    image, labels = synthetic.make_volume(d.synthetic_shape_zyx, d.synthetic_objects,
                                          d.synthetic_seed)
  else:
    image, labels = read_labelled_box(d.image, d.labels, d.box_start_zyx, d.box_size_zyx, "data")
  if labels.dtype.kind not in "iu":
    raise UserError(f"labels have dtype {labels.dtype}; labels must be integer object IDs")
  block = (np.asarray(config.model.fov_size_zyx)
           + 2 * np.asarray(config.model.deltas_zyx) * d.fov_moves)
  padding = d.get("border_padding", "none")
  if padding not in ("none", "reflect"):
    raise UserError(f"data.border_padding must be 'none' or 'reflect', got {padding!r}")
  if padding == "reflect":
    # The volumes mirrored by half a training block: example centres can then lie anywhere in
    # the training region (not only half a block inside it), as inference with
    # border_padding=reflect centres FOVs; the partitions' margin keeps them out of the mirror.
    width = [(int(b) // 2, int(b) // 2) for b in block]
    image, labels = np.pad(image, width, mode="reflect"), np.pad(labels, width, mode="reflect")
  if np.any(np.asarray(labels.shape) < block):
    raise UserError(f"training volume of shape {labels.shape} is smaller than one training "
                    f"example (FOV + 2 x deltas x fov_moves = {tuple(block)}, zyx)")
  image = (image.astype(np.float32) - d.image_mean) / d.image_stddev
  return image, labels, block


def build_examples(config, dist: parallel.Dist, workdir: str, log,
                   per_device: int) -> RecurrentExamples:
  image, labels, block = load_training_volumes(config)
  d = config.data
  margin = tuple(int(b) // 2 for b in block)
  cache = os.path.join(workdir, "cache") if dist.is_primary else None
  if dist.is_primary:
    coords = partitions.cached_coordinates(
        labels, d.thresholds, d.lom_radius_zyx, d.min_size, margin, cache, log)
  dist.barrier()
  if not dist.is_primary:
    coords = partitions.cached_coordinates(
        labels, d.thresholds, d.lom_radius_zyx, d.min_size, margin,
        os.path.join(workdir, "cache"), log)
  sampler = partitions.BalancedSampler(coords, config.seed, dist.rank, dist.size)
  return RecurrentExamples(
      image, labels, sampler, per_device * dist.local_devices,
      config.model.fov_size_zyx, config.model.deltas_zyx, d.fov_moves, d.move_threshold,
      d.augment, config.seed, dist.rank,
      prefetch_examples(config, per_device * dist.local_devices))


def prefetch_examples(config, batch: int) -> int:
  """How many new examples to prepare ahead (``data.prefetch_examples``; -1 = auto)."""
  n = int(config.data.get("prefetch_examples", 0))
  if n == -1:
    return batch if jax.default_backend() != "cpu" else 0
  return n
