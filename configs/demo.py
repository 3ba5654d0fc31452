"""``make demo``: an FFN trained from scratch on a synthetic volume in about two minutes on two
cores, good enough to segment a held-out synthetic volume of the same kind.

configs/synthetic.py's model and volume, with the recipe that reaches a segmentation soonest:
Adam at 2e-3 with a short warmup and a cosine decay to the end of the budget, and a moving
average of the parameters (what the final eval and infer.py use). The final eval floods a
validation volume (another seed) and, with ``eval.calibrate``, tunes the flood thresholds there;
``make demo`` then segments a third volume with infer.py and scores it.
"""
from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.max_steps = 3000
  c.log_every = 250
  c.checkpoint_every = 1000
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.decay_steps = c.max_steps
  c.optim.final_lr_fraction = 0.05
  c.optim.ema_decay = 0.99
  c.eval.every_steps = c.max_steps  # once, at the end
  c.eval.synthetic_seed = 1000  # the validation volume; make demo's test volume is seed 2000
  c.eval.keep_best = False
  return c
