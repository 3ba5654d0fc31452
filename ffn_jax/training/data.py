"""A training run's data: the training volumes (read, mirrored, normalized) and this rank's
recurrent example pipeline over them; also the labelled boxes the segmentation eval reads."""
from __future__ import annotations

import os

import jax
import numpy as np

from ffn_jax import parallel
from ffn_jax.data import partitions, synthetic
from ffn_jax.data.examples import RecurrentExamples
from ffn_jax.data.volumes import normalize, open_volume
from ffn_jax.errors import UserError


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
  image = normalize(image, d.image_mean, d.image_stddev)
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
