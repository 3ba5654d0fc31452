"""``make demo``: an FFN trained from scratch on a synthetic EM volume in a few minutes on two
cores, then used to segment a held-out synthetic volume.

configs/synthetic.py's model (depth 3, 16 features, FOV 17³) on a denser training volume (48
objects instead of 16: more membranes per FOV, which is what the model learns from; on the
16-object volume the same budget stalls at training F1 ~0.4), with Adam at 1e-3, a short
warmup and a cosine decay to the end of the 3,000 steps (12,000 examples), and a moving average
of the parameters, which is what infer.py loads. No in-training eval (the demo scores its
held-out volume after training instead; ``--config.eval.every_steps=N`` turns one on).
"""
from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.data.synthetic_objects = 48
  c.max_steps = 3000
  c.log_every = 250
  c.checkpoint_every = 1000
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.decay_steps = c.max_steps
  c.optim.final_lr_fraction = 0.05
  c.optim.ema_decay = 0.99
  c.eval.every_steps = 0
  c.eval.border_padding = "reflect"
  c.eval.keep_best = False
  return c
