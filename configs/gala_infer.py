"""Segment gala_test (the held-out gala volume) with a model trained by configs/gala.py or
configs/gala_finetune.py: ``--config.checkpoint=WORKDIR``.

Google's inference settings, as the training eval used them: min segment size 100 (gala's
objects are small), normalization from the checkpoint (what it was trained with), and the canvas
mirrored at the borders, since gala is only 50 slices thick.
"""
import os

from configs import fib25_infer

_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def get_config():
  c = fib25_infer.get_config()
  c.image = os.path.join(_DATA, "gala_test", "image.zarr")
  c.image_mean = -1.0  # from the checkpoint
  c.image_stddev = -1.0
  c.inference.min_segment_size = 100
  c.border_padding = "reflect"
  c.batch_size = 4
  return c
