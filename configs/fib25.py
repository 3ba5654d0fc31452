"""Paper-scale FFN on FIB-25 (Google's FIB-25 model: depth 12, FOV 33^3, deltas 8^3).

Trains on the z < 100 slab of fib25_training_sample2 (../shared/data/README.md reserves
z >= 125 for evaluation). Override ``data.image``/``data.labels`` to train on other volumes.
Every 30 minutes and at the end, ``eval`` floods the 100^3 box ``EVAL_BOX`` (z >= 125) with
Google's inference settings and logs its VI.
"""
import os

from configs import synthetic

_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
# The evaluation box (zyx start, size) of docs/quality.md: 100^3 at z >= 125, picked for the
# variety of its labels (65 objects, the largest 16 % of it) before any model was scored on it.
EVAL_BOX = ((125, 150, 0), (100, 100, 100))


def get_config():
  c = synthetic.get_config()
  c.model.depth = 12
  c.model.features = 32
  c.model.fov_size_zyx = (33, 33, 33)
  c.model.deltas_zyx = (8, 8, 8)

  c.data.image = os.environ.get(
      "FFN_FIB25_IMAGE", os.path.join(_DATA, "fib25_training_sample2", "image.zarr"))
  c.data.labels = os.environ.get(
      "FFN_FIB25_LABELS", os.path.join(_DATA, "fib25_training_sample2", "labels.zarr"))
  c.data.box_start_zyx = (0, 0, 0)
  c.data.box_size_zyx = (100, 250, 250)  # z < 100: the training slab
  c.data.image_mean = 128.0
  c.data.image_stddev = 33.0
  c.data.lom_radius_zyx = (16, 16, 16)
  c.data.min_size = 1000

  c.batch_size = 4
  c.optim.name = "sgd"  # Google's FFN default optimizer
  c.optim.learning_rate = 1e-3
  c.optim.reference_batch = 4
  c.max_steps = 100000
  c.log_every = 20
  c.checkpoint_every = 500

  c.eval.image = c.data.image
  c.eval.labels = c.data.labels
  c.eval.box_start_zyx, c.eval.box_size_zyx = EVAL_BOX
  c.eval.every_s = 1800.0
  c.eval.inference.min_segment_size = 1000  # Google's settings for FIB-25
  c.eval.batch_size = 4
  c.eval.keep_best = False  # EVAL_BOX is a test box: report the final model
  return c
