"""An FFN trained from scratch on gala_train (../shared/data/README.md; gala_test is held out).

A small model for a 2-core machine: depth 6, 24 features, FOV 17^3, deltas 4^3, Adam 1e-3
with cosine decay over the run, batch 8. Image normalization is gala's own (mean 148, sd 55).
At the start, after 8,000 steps and at the end, ``eval`` floods the held-out ``gala_test`` with the current
parameters (Google's inference settings, min segment size 100, the canvas mirrored at the
borders: gala is only 50 slices thick) and logs its VI. docs/quality.md has the measured runs;
add ``--config.model.compute_dtype=bfloat16`` for bfloat16 convolutions (fastest on CPUs with
AVX512-BF16 or AMX, where ``auto`` already picks them).
"""
import os

from configs import synthetic

_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def get_config():
  c = synthetic.get_config()
  c.model.depth = 6
  c.model.features = 24
  c.model.fov_size_zyx = (17, 17, 17)
  c.model.deltas_zyx = (4, 4, 4)
  c.model.conv_impl = "auto"

  c.data.image = os.path.join(_DATA, "gala_train", "image.zarr")
  c.data.labels = os.path.join(_DATA, "gala_train", "labels.zarr")
  c.data.image_mean = 148.0
  c.data.image_stddev = 55.0
  c.data.lom_radius_zyx = (6, 6, 6)
  c.data.min_size = 100

  c.batch_size = 8
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.reference_batch = 8
  c.optim.schedule = "cosine"
  c.optim.decay_steps = 16000
  c.optim.final_lr_fraction = 0.05
  c.max_steps = 16000  # 128k FOVs: ~57 min on 2 cores at ~42 FOV/s, evals included
  c.log_every = 100
  c.checkpoint_every = 2000

  c.eval.image = os.path.join(_DATA, "gala_test", "image.zarr")
  c.eval.labels = os.path.join(_DATA, "gala_test", "labels.zarr")
  c.eval.every_s = 0.0
  c.eval.every_steps = 8000
  c.eval.at_start = True
  c.eval.border_padding = "reflect"
  c.eval.inference.min_segment_size = 100
  c.eval.batch_size = 8
  # gala_test is the test volume here: the final model is the one to report, so no best-VI
  # pick on it. With a separate validation volume, keep_best = True selects on that instead.
  c.eval.keep_best = False
  return c
