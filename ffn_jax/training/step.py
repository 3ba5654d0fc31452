"""The pure training step: gradients of the soft-label loss, then the optax update.

Split in two so that ``ffn_jax.parallel`` can average gradients over local devices and MPI ranks
in between; ``train_step`` composes both for one device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ffn_jax import losses
from ffn_jax.training.state import TrainState


def grads_and_stats(params, batch, *, model):
  """Returns (grads, stats, logits_BZYX1) for one batch; stats hold loss and confusion counts."""
  def loss_fn(p):
    logits_BZYX1 = model.apply({"params": p}, batch["image"], batch["seed"])
    return losses.sigmoid_xent(logits_BZYX1, batch["labels"]), logits_BZYX1

  (loss, logits_BZYX1), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  stats = {"loss": loss, **losses.confusion_counts(logits_BZYX1, batch["labels"])}
  return grads, stats, logits_BZYX1


def apply_update(state: TrainState, grads, *, tx: optax.GradientTransformation,
                 ema_decay: float = 0.0) -> TrainState:
  """The optimizer step; then, where ``state`` keeps one, the moving average of the parameters
  with decay ``min(ema_decay, (1 + t) / (10 + t))`` at step t (TensorFlow's
  ``ExponentialMovingAverage(num_updates=t)``: the early average follows the fast-moving
  parameters instead of holding on to the initialization)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    t = state.step.astype(jnp.float32)
    d = jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))
    ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def train_step(state: TrainState, batch, *, model, tx, ema_decay: float = 0.0):
  """One device: (state, batch) -> (state, stats, logits)."""
  grads, stats, logits_BZYX1 = grads_and_stats(state.params, batch, model=model)
  return apply_update(state, grads, tx=tx, ema_decay=ema_decay), stats, logits_BZYX1
