"""Google's pretrained FIB-25 FFN fine-tuned on the z < 100 slab of fib25_training_sample2.

Needs the imported checkpoint (``python -m ffn_jax.import_tf_checkpoint
../shared/data/google_ffn_fib25/model.ckpt-27465036 --out runs/fib25_google``). Google trained it
on another FIB-25 volume (validation1), so this adapts it to training_sample2's slab, gently:
Adam at 2e-5 after a 100-step warmup from 0. The eval (``configs/fib25.EVAL_BOX``, z >= 125,
float32 convolutions as in Google's reference runs) also runs at step 0: Google's model as is.
"""
import os

from configs import fib25

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def get_config():
  c = fib25.get_config()
  c.init_checkpoint = os.path.join(_REPO, "runs", "fib25_google")
  c.optim.name = "adam"
  c.optim.learning_rate = 2e-5
  c.optim.warmup_steps = 100
  c.max_steps = 2000
  c.log_every = 20
  c.checkpoint_every = 250
  c.eval.every_s = 1200.0
  c.eval.at_start = True
  c.eval.conv_impl = "onednn"  # float32 in the eval, whatever the training route
  return c
