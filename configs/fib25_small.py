"""A small FFN trained from scratch on the z < 100 slab of fib25_training_sample2.

The gala recipe (configs/gala.py: depth 6, 24 features, FOV 17^3, deltas 4^3, batch 8, Adam at
3e-4 with cosine decay and a moving average of the parameters, decay 0.999) on FIB-25
(normalized with 128 / 33): what a 2-core machine can train in an hour. The recipe's optimizer
settings were measured on gala (docs/benchmarks.md §5), not yet on FIB-25; the 1e-3 run of
docs/quality.md predates them. Every 20 minutes and at the end the eval floods ``configs/fib25.EVAL_BOX`` (z >= 125)
with Google's inference settings.
"""
from configs import fib25, gala


def get_config():
  c = fib25.get_config()
  small = gala.get_config()
  c.model = small.model
  c.data.lom_radius_zyx = small.data.lom_radius_zyx
  c.batch_size = small.batch_size
  c.optim = small.optim
  c.max_steps = small.max_steps
  c.log_every = small.log_every
  c.checkpoint_every = small.checkpoint_every
  c.eval.every_s = 1200.0
  c.eval.batch_size = 8
  return c
